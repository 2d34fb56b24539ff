"""Which exit drafts, and how far: acceptance measured with the engine, turned into a predicted speedup by a
weight-bytes cost model.

Lossless drafting at batch 1 is memory-bound: a step costs about the bytes of the weights it reads, and a
verification of k + 1 positions costs about one full step. So a draft token at exit l costs

    c = bytes(layers 1..l + the exit's adapter + the draft head) / bytes(all layers + the LM head)

of a full step, and with conditional acceptance a_i at draft position i (the draft's i-th token is accepted given
the ones before it were), one verification yields E = 1 + sum_i prod_{j<=i} a_j tokens for k c + 1 steps' cost:

    predicted speedup = E / (k c + 1)

(Leviathan et al. 2023, with measured per-position acceptance instead of a constant rate). It holds for a separate
draft model (vLLM, transformers' ``assistant_model``) and for self-speculation in our engine alike: reusing the
draft's layers 1..l for verification saves no bytes, because the k + 1 drafted columns (the last token and its k
drafts) each pass through layers 1..l once anyway. The same model prices LLaMA-2-7B on a GPU, where a step is
equally bound by weight bytes: LayerSkip's Llama2-7B exit 8 of 32 with acceptance 0.79 gives 1.42x at k = 1 and
1.62x at k = 3.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from torch import nn

from layerexit.models.exits import decoder_parts


@dataclass
class AcceptanceStats:
    """Self-speculative decoding at one draft layer with ``num_draft`` drafts, measured on real prompts."""

    layer: int
    num_draft: int
    per_position: list[float]  # conditional acceptance a_1..a_k
    tokens_per_verification: float  # measured: emitted tokens / verification steps
    steps: int
    drafted: int  # draft tokens proposed
    accepted: int

    @property
    def acceptance(self) -> float:
        """Share of proposed draft tokens accepted (vLLM's draft acceptance rate)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "acceptance": self.acceptance}


def measure_acceptance(engine, prompts: Sequence[Sequence[int]], layer: int, num_draft: int,
                       max_new_tokens: int = 48, draft_vocab: str | None = None, batch_size: int = 4
                       ) -> AcceptanceStats:
    """Run lossless self-speculative decoding (fixed draft length) and count, per step and row, how many of the
    proposed drafts the final layer accepted."""
    from layerexit.engine.options import ExitConfig, SamplingParams

    cfg = ExitConfig(policy="self-speculative", layer=layer, num_draft=num_draft, draft="layer",
                     draft_vocab=draft_vocab)
    reached = [0] * num_draft
    passed = [0] * num_draft
    steps = emitted = drafted = accepted = 0
    for start in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[start : start + batch_size]]
        produced = [0] * len(chunk)
        first = True
        for events in engine.stream(chunk, cfg, SamplingParams(max_new_tokens=max_new_tokens)):
            by_row: dict[int, list] = {}
            for ev in events:
                by_row.setdefault(ev.index, []).append(ev)
            for row, evs in by_row.items():
                if first:  # the prefill's token: no draft
                    produced[row] += len(evs)
                    continue
                proposed = min(num_draft, max(0, max_new_tokens - produced[row] - 1))
                produced[row] += len(evs)
                if evs[-1].finished and evs[-1].finish_reason == "stop":
                    continue  # cut at EOS: the step's accepted count is not fully seen
                a = sum(ev.exit_layer == layer for ev in evs)
                steps += 1
                emitted += len(evs)
                drafted += proposed
                accepted += a
                for i in range(proposed):
                    if a >= i:
                        reached[i] += 1
                        passed[i] += int(a > i)
            first = False
    per_position = [p / r if r else 0.0 for p, r in zip(passed, reached)]
    return AcceptanceStats(layer, num_draft, per_position, emitted / steps if steps else 1.0, steps, drafted,
                           accepted)


def _bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def draft_cost_ratio(model: nn.Module, layer: int, draft_vocab_size: int | None = None) -> float:
    """Weight bytes a draft token reads (layers 1..layer, the exit's adapter, the draft head) over a full step's
    (every layer and the LM head)."""
    parts = decoder_parts(model)
    layer_bytes = [_bytes(l) for l in parts.layers]
    head = _bytes(parts.head)
    vocab = parts.head.weight.shape[0]
    draft_head = head * (draft_vocab_size / vocab if draft_vocab_size else 1.0)
    adapter = parts.adapters.get(layer)
    adapter_bytes = _bytes(adapter) if adapter is not None else 0
    return (sum(layer_bytes[:layer]) + adapter_bytes + draft_head) / (sum(layer_bytes) + head)


def expected_tokens(per_position: Sequence[float], num_draft: int) -> float:
    """Tokens one verification yields: 1 + sum over the first ``num_draft`` positions of prod_{j<=i} a_j."""
    expected, run = 1.0, 1.0
    for a in list(per_position)[:num_draft]:
        run *= a
        expected += run
    return expected


def predicted_speedup(per_position: Sequence[float], cost_ratio: float, num_draft: int | None = None) -> float:
    """E / (k c + 1) for the first ``num_draft`` positions (default: all measured)."""
    k = len(per_position) if num_draft is None else num_draft
    return expected_tokens(per_position, k) / (k * cost_ratio + 1.0)


def llama_shape_cost_ratio(layer: int, num_layers: int = 32, hidden: int = 4096, intermediate: int = 11008,
                           vocab: int = 32000, kv_heads_ratio: float = 1.0, adapter_layers: int = 0) -> float:
    """``draft_cost_ratio`` from a LLaMA shape instead of a loaded model (defaults: LLaMA-2-7B), for pricing a
    draft on a model that does not fit here: layers 1..layer plus ``adapter_layers`` decoder layers plus the head,
    over every layer plus the head."""
    attn = hidden * hidden * (2 + 2 * kv_heads_ratio)  # q, o + k, v (grouped-query shrinks k, v)
    one = attn + 3 * hidden * intermediate
    head = vocab * hidden
    return ((layer + adapter_layers) * one + head) / (num_layers * one + head)


def speedup_from_counters(accepted_tokens: float, drafts: float, num_draft: int, cost_ratio: float) -> float:
    """The cost model from a server's counters (vLLM's ``spec_decode_num_accepted_tokens`` and ``..._num_drafts``):
    E = 1 + accepted / drafts tokens per verification, over k c + 1."""
    expected = 1.0 + (accepted_tokens / drafts if drafts else 0.0)
    return expected / (num_draft * cost_ratio + 1.0)


@dataclass
class DraftChoice:
    layer: int
    num_draft: int
    cost_ratio: float
    predicted_speedup: float
    stats: AcceptanceStats

    def settings(self, draft_vocab: str | None = None) -> dict:
        return {"layer": self.layer, "num_draft": self.num_draft, "draft": "layer", "draft_vocab": draft_vocab}


def choose_draft(model: nn.Module, engine, prompts: Sequence[Sequence[int]], layers: Sequence[int],
                 max_draft: int = 6, max_new_tokens: int = 48, draft_vocab: str | None = None,
                 draft_vocab_size: int | None = None) -> tuple[DraftChoice, list[DraftChoice]]:
    """Measure every candidate layer at ``max_draft`` drafts, then pick (layer, k <= max_draft) with the best
    predicted speedup. Returns the choice and every layer's best (a best below 1.0 means no draft pays)."""
    rows = []
    for layer in layers:
        stats = measure_acceptance(engine, prompts, layer, max_draft, max_new_tokens, draft_vocab)
        c = draft_cost_ratio(model, layer, draft_vocab_size)
        k = max(range(1, max_draft + 1), key=lambda n: predicted_speedup(stats.per_position, c, n))
        rows.append(DraftChoice(layer, k, c, predicted_speedup(stats.per_position, c, k), stats))
    best = max(rows, key=lambda r: r.predicted_speedup)
    return best, rows
