"""Trace replay for the draft search: lossless self-speculative decoding replayed on recorded traces (a layer-l
draft of the final layer's greedy prefix computes exactly what the trace holds), the same counts as
``measure_acceptance`` decoding, in milliseconds; and the score of one (layer, k) point."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from layerexit.tuning.draft_choice import AcceptanceStats, expected_tokens, measure_acceptance, predicted_speedup


@dataclass(frozen=True)
class _Event:
    index: int
    exit_layer: int
    finished: bool = False
    finish_reason: str | None = None


class TraceReplay:
    """Stands in for the engine in ``measure_acceptance``: replays lossless self-speculative decoding on traces.

    ``matches[s][t]``: does the draft layer's top-1 equal answer token t of sequence s (the final layer's greedy
    token, given the answer so far)? A layer-l draft of that prefix computes exactly what the trace holds, so a
    step accepts the leading matches among its proposed tokens and the verification adds one token, as the engine
    does. "Prompts" are ``[s]``: the sequence to replay."""

    FINAL = -1

    def __init__(self, matches: Sequence[Sequence[bool]], ended_by_eos: Sequence[bool]) -> None:
        self.matches, self.ended_by_eos = matches, ended_by_eos

    def stream(self, chunk, cfg, sampling):
        layer, k, mx = cfg.layer, cfg.num_draft, sampling.max_new_tokens
        rows = [(i, self.matches[p[0]], self.ended_by_eos[p[0]]) for i, p in enumerate(chunk)]
        produced = {i: 1 for i, m, _ in rows if m}
        yield [self._event(i, self.FINAL, 1, len(m), eos) for i, m, eos in rows if m]  # the prefill's token
        while any(produced[i] < len(m) for i, m, _ in rows if m):
            step = []
            for i, m, eos in rows:
                n = len(m)
                if not m or produced[i] >= n:
                    continue
                proposed = min(k, max(0, mx - produced[i] - 1))
                a = 0
                while a < proposed and produced[i] + a < n and m[produced[i] + a]:
                    a += 1
                out = min(a + 1, n - produced[i])
                layers = [layer] * min(a, out) + [self.FINAL] * (out - min(a, out))
                for j, l in enumerate(layers, start=1):
                    step.append(self._event(i, l, produced[i] + j, n, eos))
                produced[i] += out
            yield step

    @staticmethod
    def _event(index: int, exit_layer: int, produced: int, n: int, eos: bool) -> _Event:
        if produced < n:
            return _Event(index, exit_layer)
        return _Event(index, exit_layer, True, "stop" if eos else "length")


def simulate_acceptance(matches: Sequence[Sequence[bool]], ended_by_eos: Sequence[bool], layer: int,
                        num_draft: int, max_new_tokens: int) -> AcceptanceStats:
    """``measure_acceptance`` on traces (``TraceReplay``): the same counts as decoding, in milliseconds."""
    replay = TraceReplay(matches, ended_by_eos)
    return measure_acceptance(replay, [[s] for s in range(len(matches))], layer, num_draft, max_new_tokens,
                              batch_size=max(1, len(matches)))


def trace_matches(traces, responses: Sequence[Sequence[int]], layers: Sequence[int]) -> dict[int, list[list[bool]]]:
    """Per layer and answer: does the layer's traced top-1 equal each answer token?"""
    import numpy as np

    out: dict[int, list[list[bool]]] = {l: [] for l in layers}
    for s, resp in enumerate(responses):
        rows = traces.sequence == s
        for l in layers:
            j = traces.layers.index(l)
            out[l].append((traces.top1[rows, j] == np.asarray(resp, dtype=traces.top1.dtype)).tolist()
                          if len(resp) else [])
    return out


def score_point(stats: AcceptanceStats, cost_ratio: float, k: int) -> dict[str, Any]:
    """One (layer, k) point's figures from acceptance measured at k (or at a longer draft, truncated to k)."""
    per_position = list(stats.per_position[:k])
    e = expected_tokens(per_position, k)
    exact = stats.num_draft == k
    metrics: dict[str, Any] = {
        "layer": stats.layer, "num_speculative_tokens": k,
        # vLLM's draft acceptance rate: accepted / proposed (at a longer measured draft: expected, from the rates)
        "acceptance": stats.acceptance if exact else (e - 1.0) / k,
        "expected_tokens": e, "cost_ratio": cost_ratio,
        "predicted_speedup": predicted_speedup(per_position, cost_ratio, k),
        "tokens_per_verification": stats.tokens_per_verification if exact else e,
        "measured_at_k": stats.num_draft, "steps": stats.steps, "drafted": stats.drafted, "accepted": stats.accepted,
    }
    metrics.update({f"accept_pos_{i}": a for i, a in enumerate(per_position, start=1)})
    return metrics
