"""Exit policies: per generated token, at which layer to stop. One interface, chosen by name.

Three kinds: policies that look at the exit layer's prediction (``confidence``, ``classifier``) are asked at
each exit layer in order and cost one LM-head evaluation per check; ``probe`` looks at the hidden state
through a learned linear probe (2*H FLOPs per check) and evaluates the head once, at the exit; the others
(``final``, ``fixed``, ``random``, ``random-uniform``, ``sequential``) pick the exit layer up front and
evaluate the head once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from layerexit.engine.thresholds import LinearClassifier, LinearProbe

POLICY_NAMES = (
    "final", "fixed", "confidence", "classifier", "probe", "random", "random-uniform", "sequential", "self-speculative",
)


def top2_features(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 probability and the gap to the second (AdaInfer's two features)."""
    top = probs.topk(2, dim=-1).values  # Shape: (n, 2)
    return top[:, 0], top[:, 0] - top[:, 1]


class ExitPolicy(ABC):
    """Base class. ``exit_layers`` are the intermediate layers checked, ascending; the final layer L is implicit."""

    name: str = ""
    uses_logits: bool = False
    uses_hidden: bool = False

    def __init__(self, exit_layers: Sequence[int], num_layers: int) -> None:
        self.exit_layers = sorted(set(exit_layers))
        self.num_layers = num_layers

    @property
    def checkpoints(self) -> list[int]:
        """Exit layers plus the final layer."""
        return [*self.exit_layers, self.num_layers]

    def choose_layers(self, n: int, step: int, generator: torch.Generator | None) -> torch.Tensor:
        """Logits-free policies: the exit layer of each of ``n`` rows for this step."""
        raise NotImplementedError

    def should_exit(self, layer: int, probs: torch.Tensor) -> torch.Tensor:
        """Logits policies: whether each row (probs (n, V) at ``layer``) exits here."""
        raise NotImplementedError

    def exit_scores(self, layer: int, normed: torch.Tensor) -> torch.Tensor:
        """Hidden-state policies: a score in [0, 1] per row from the final-normed hidden state (n, H)."""
        raise NotImplementedError

    def should_exit_hidden(self, layer: int, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden-state policies: (exit?, score) per row."""
        raise NotImplementedError


class FinalPolicy(ExitPolicy):
    name = "final"

    def __init__(self, num_layers: int) -> None:
        super().__init__([], num_layers)

    def choose_layers(self, n, step, generator):
        return torch.full((n,), self.num_layers, dtype=torch.long)


class FixedPolicy(ExitPolicy):
    name = "fixed"

    def __init__(self, layer: int, num_layers: int) -> None:
        super().__init__([layer] if layer < num_layers else [], num_layers)
        self.layer = layer

    def choose_layers(self, n, step, generator):
        return torch.full((n,), self.layer, dtype=torch.long)


class RandomPolicy(ExitPolicy):
    """Appendix E: at each checkpoint exit with probability ``p`` (1/2, or 1/#checkpoints for random-uniform)."""

    def __init__(self, exit_layers: Sequence[int], num_layers: int, uniform: bool = False) -> None:
        super().__init__(exit_layers, num_layers)
        self.name = "random-uniform" if uniform else "random"
        self.p = 1.0 / max(1, len(self.exit_layers)) if uniform else 0.5

    def choose_layers(self, n, step, generator):
        chosen = torch.full((n,), self.num_layers, dtype=torch.long)
        undecided = torch.ones(n, dtype=torch.bool)
        for layer in self.exit_layers:
            draw = torch.rand(n, generator=generator) < self.p
            take = undecided & draw
            chosen[take] = layer
            undecided &= ~take
        return chosen


class SequentialPolicy(ExitPolicy):
    """Appendix E: the exit layer cycles over the checkpoints (exits then final), token by token."""

    name = "sequential"

    def choose_layers(self, n, step, generator):
        cps = self.checkpoints
        return torch.full((n,), cps[step % len(cps)], dtype=torch.long)


class ConfidencePolicy(ExitPolicy):
    """Paper section 4.2: exit at the first exit layer whose top-1 softmax probability >= its threshold."""

    name = "confidence"
    uses_logits = True

    def __init__(self, thresholds: dict[int, float], num_layers: int) -> None:
        super().__init__([l for l in thresholds if l < num_layers], num_layers)
        self.thresholds = {int(k): float(v) for k, v in thresholds.items()}

    def should_exit(self, layer, probs):
        return probs.max(dim=-1).values >= self.thresholds[layer]


class ClassifierPolicy(ExitPolicy):
    """AdaInfer: a linear SVM per exit layer on [top prob, gap] says whether this layer already matches the final."""

    name = "classifier"
    uses_logits = True

    def __init__(self, classifier: LinearClassifier, num_layers: int) -> None:
        super().__init__([l for l in classifier.coef if l < num_layers], num_layers)
        self.classifier = classifier

    def should_exit(self, layer, probs):
        c = self.classifier
        top, gap = top2_features(probs.float())
        x = torch.stack([top, gap], dim=-1)
        mean = torch.tensor(c.mean[layer], device=x.device)
        scale = torch.tensor(c.scale[layer], device=x.device)
        w = torch.tensor(c.coef[layer], device=x.device)
        return ((x - mean) / scale) @ w + c.intercept[layer] > 0


class ProbePolicy(ExitPolicy):
    """A linear probe per exit layer on the final-normed hidden state predicts "this layer's top-1 equals the
    final layer's" (CALM's cheap classifier signal). Exit when its probability >= the layer's threshold; the
    LM head then runs once, at the exit layer, instead of at every check."""

    name = "probe"
    uses_hidden = True

    def __init__(self, probe: LinearProbe, thresholds: dict[int, float], num_layers: int) -> None:
        layers = [l for l in probe.weight if l < num_layers and l in thresholds]
        super().__init__(layers, num_layers)
        self.thresholds = {int(k): float(v) for k, v in thresholds.items()}
        self._w = {l: torch.tensor(probe.weight[l]) for l in layers}
        self._b = {l: float(probe.bias[l]) for l in layers}

    def exit_scores(self, layer, normed):
        w = self._w[layer].to(normed.device, normed.dtype)
        return torch.sigmoid((normed @ w[:, None]).squeeze(-1).float() + self._b[layer])

    def should_exit_hidden(self, layer, normed):
        score = self.exit_scores(layer, normed)
        return score >= self.thresholds[layer], score
