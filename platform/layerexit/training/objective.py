"""The LITE training objective over a stock HF model: the exit losses (and, with a frozen teacher, the
final-layer anchor) as one ``nn.Module`` the engine trains."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from layerexit.data.datasets import IGNORE_INDEX
from layerexit.losses import lite_loss
from layerexit.models.exits import collect_hidden_states, decoder_parts


class FrozenTeacher:
    """A frozen copy of the starting model, the reference for the anchor KL. Deliberately not an ``nn.Module``
    attribute of the objective, so DeepSpeed neither partitions nor optimises it."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.parts = decoder_parts(self.model)

    @torch.no_grad()
    def final_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        L = self.parts.num_layers
        return collect_hidden_states(self.model, input_ids, [L], attention_mask)[L]

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.parts.head(self.parts.norm(hidden))


def _anchor_chunk(hidden: torch.Tensor, teacher_logp: torch.Tensor, labels: torch.Tensor, norm: Callable,
                  head: Callable) -> torch.Tensor:
    # Shape: hidden (B, c, H), teacher_logp (B, c, V), labels (B, c) -> scalar sum over response positions
    student = F.log_softmax(head(norm(hidden)).float(), dim=-1)
    kl = F.kl_div(student, teacher_logp, log_target=True, reduction="none").sum(-1)  # Shape: (B, c)
    return (kl * (labels != IGNORE_INDEX)).sum()


def anchor_kl(hidden: torch.Tensor, teacher_hidden: torch.Tensor, labels: torch.Tensor, norm: Callable,
              head: Callable, teacher_logits: Callable[[torch.Tensor], torch.Tensor],
              chunk_size: int | None = 128) -> torch.Tensor:
    """Mean over response tokens of KL(teacher final layer || student final layer), chunked like the LITE loss."""
    # Shape: position t predicts label t+1 -> hidden (B, T-1, H), labels (B, T-1)
    hidden, teacher_hidden, labels = hidden[:, :-1], teacher_hidden[:, :-1], labels[:, 1:]
    n_valid = int((labels != IGNORE_INDEX).sum())
    total = hidden.new_zeros((), dtype=torch.float32)
    step = chunk_size or hidden.shape[1]
    for start in range(0, hidden.shape[1], step):
        sl = slice(start, start + step)
        # No skipping of label-free chunks: head calls per micro-batch must not depend on the data (ZeRO-3,
        # see layerexit.losses.lite).
        t_logp = F.log_softmax(teacher_logits(teacher_hidden[:, sl]).float(), dim=-1)  # Shape: (B, c, V)
        if torch.is_grad_enabled() and hidden.requires_grad:
            total = total + checkpoint(_anchor_chunk, hidden[:, sl], t_logp, labels[:, sl], norm, head,
                                       use_reentrant=False)
        else:
            total = total + _anchor_chunk(hidden[:, sl], t_logp, labels[:, sl], norm, head)
    return total / max(n_valid, 1)


class LiteObjective(nn.Module):
    """Wraps a stock HF causal LM; ``forward`` returns the LITE loss and its parts. This is what DeepSpeed wraps,
    so the forward goes through ``engine(...)`` and its gradient-accumulation hooks."""

    def __init__(self, model: nn.Module, weights: Mapping[int, float], chunk_size: int | None = 128,
                 distill_weight: float = 0.0, anchor_weight: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.weights = dict(weights)
        self.chunk_size = chunk_size
        self.distill_weight = distill_weight
        self.anchor_weight = anchor_weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                teacher: FrozenTeacher | None = None) -> dict:
        parts = decoder_parts(self.model)
        L = parts.num_layers
        hidden = collect_hidden_states(self.model, input_ids, self.weights.keys(), attention_mask)
        out = lite_loss(hidden, labels, parts.norm, parts.head, self.weights, self.chunk_size, self.distill_weight)
        result = {"loss": out.loss, "per_layer": out.per_layer, "distill": out.distill,
                  "num_tokens": torch.tensor(float(out.num_tokens))}
        if self.anchor_weight > 0 and teacher is not None:
            t_hidden = teacher.final_hidden(input_ids, attention_mask)
            kl = anchor_kl(hidden[L], t_hidden, labels, parts.norm, parts.head, teacher.logits, self.chunk_size)
            result["loss"] = out.loss + self.anchor_weight * kl
            result["anchor"] = kl.detach()
        return result
