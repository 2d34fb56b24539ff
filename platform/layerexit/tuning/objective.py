"""Score an exit rule on traces in milliseconds: expected FLOPs ratio vs the final layer, and agreement.

Traces hold, for every token of the final layer's greedy responses and every traced layer, that layer's top-1
token and confidence given the same prefix. Under the confidence policy with ``kv=recompute`` (exact cache) the
engine's decision for a token on that prefix is therefore known without running the model: the first checked
layer whose confidence reaches its threshold, else the final layer. Agreement is the share of tokens whose exit
layer's top-1 equals the final layer's.

FLOPs follow the engine's accounting for one sequence at a time (batch 1), decode steps only (the prefill runs every
layer whatever the policy and is left out of both sides, as ``SequenceResult.flops`` leaves it out):

- first response token: decided from the prefill's hidden states, so it costs its head checks only (full: 1 head);
- token s >= 1: the pass for position t = P + s - 1 runs layers 1..e_s (e_s its exit layer) plus one head per
  check; full depth costs ``L * layer(1, t + 1) + head(1)``. What the skipped layers cost depends on the KV strategy:
- ``recompute`` (exact KV): layer k also processes every earlier position that skipped it (those after the last
  pass that reached k), as the engine does, so a layer costs ``layer(q, t + 1)`` with q the positions it catches
  up. Skipped work is deferred, not saved, except catch-up still owed when the sequence ends (the engine never pays
  it either). Decisions on traces equal the engine's exactly.
- ``propagate`` (CALM): layers e_s+1..L get only the K/V projections of h_{e_s}: ``(L - e_s) * kv_projection(1)``.
  Later tokens' deep layers then see approximate K/V, so decisions (and agreement) on traces are an estimate there.
- ``none`` (the paper's setting, no KV cache): every token, the first included, runs the whole prefix through
  layers 1..e_s: ``e_s * layer(T, T)`` with T = t + 1 (full: ``L * layer(T, T) + head(1)``); exits save for real.
- ``per-token``: ``e_s * layer(1, t + 1)`` plus heads, nothing for skipped layers (optimistic approximation).

For a given sequence of exit layers, ``recompute``, ``propagate`` and ``none`` equal the engine's
``SequenceResult.flops`` exactly (tests check it).

Checks are priced as the policy pays them. ``check="head"`` (confidence): every check is an LM-head evaluation and
the exit's own check yields the token. ``check="probe"``: the traces' ``conf`` columns hold the probe's
probabilities (``probe_traces``), every check costs one probe evaluation (2 x hidden FLOPs) and the head runs once
per token, at the exit; that is the engine's ``probe`` policy.

``check_vocab=K`` prices head checks as the engine's candidate-set checks do: a token's first check is a full head
(it picks the K candidates), every later check (the final layer's included) scores K rows, 2 x hidden x K FLOPs.
Decisions on traces stay those of full-vocabulary confidences, which never exceed the candidate-set ones (the same
top logits renormalised over fewer tokens): with K < V the engine exits at least as early, so the traced
agreement is an estimate there and the FLOPs an upper bound.

``check_head="static:N"`` prices the engine's static check head: every intermediate check scores N head rows
(2 x hidden x N FLOPs, after the layer's adapter) and the full head runs once per token, at its exit (the token is
the full head's argmax there, as on the traces); decisions use the confidences the N rows see (``check_conf`` of
the traces). ``check_head="candidates:K"`` is ``check_vocab=K`` with the candidate-set confidences of the traces.

``adapter_flops={layer: f}`` prices exit adapters (the adapters recipe): every check at an adapted layer, head or
probe, first runs the layer's adapter (f FLOPs per position), as the engine does.

``batch_size=b`` scores as Serve runs a batch: b sequences decode together and each step runs every row to the
deepest exit among them (the batch rule); a row still takes its token (and its agreement) from its own exit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from layerexit.engine.flops import FlopsModel
from layerexit.engine.traces import ExitTraces

ACCOUNTING = ("recompute", "propagate", "none", "per-token")
CHECKS = ("head", "probe")


@dataclass
class Score:
    """What one exit rule does on the traces."""

    flops_ratio: float  # expected decode FLOPs / final layer's
    agreement: float  # share of tokens whose exit layer's top-1 equals the final layer's
    mean_exit_layer: float
    checks_per_token: float  # LM-head evaluations per token
    exit_share: dict[int, float]  # share of tokens exiting at each checkpoint (final included)
    flops: float
    flops_full: float

    def metrics(self) -> dict[str, float]:
        out = {"flops_ratio": self.flops_ratio, "agreement": self.agreement, "mean_exit_layer": self.mean_exit_layer,
               "checks_per_token": self.checks_per_token}
        out.update({f"exit_share_{l:02d}": v for l, v in self.exit_share.items()})
        return out


class TraceScorer:
    """Model-free: arrays from ``ExitTraces`` and the per-position FLOPs costs. Cheap to pickle into Ray's store."""

    def __init__(self, traces: ExitTraces, flops: FlopsModel, accounting: str = "recompute",
                 check: str = "head", check_vocab: int | str | None = None, batch_size: int = 1,
                 adapter_flops: Mapping[int, float] | None = None, check_head: str | None = None) -> None:
        if accounting not in ACCOUNTING:
            raise ValueError(f"unknown FLOPs accounting {accounting!r}; use one of {', '.join(ACCOUNTING)}")
        if check not in CHECKS:
            raise ValueError(f"unknown check pricing {check!r}; use one of {', '.join(CHECKS)}")
        self.check = check
        self.static_n = None
        self.check_head = check_head or "full"
        if check_head not in (None, "full"):
            from layerexit.engine.traces import parse_check_spec

            kind, size = parse_check_spec(check_head)
            if check != "head":
                raise ValueError(f"check head {check_head!r} applies to head checks, not {check!r}")
            if not 1 <= int(size) <= flops.vocab:
                raise ValueError(f"check_vocab {size} is outside 1..{flops.vocab}")
            if kind == "static":
                self.static_n = int(size)
            else:
                check_vocab = int(size)
        if check_vocab in (None, "full"):
            self.check_k = None
        else:
            self.check_k = int(check_vocab)
            if not 1 <= self.check_k <= flops.vocab:
                raise ValueError(f"check_vocab {self.check_k} is outside 1..{flops.vocab}")
        self.candidate = float(2 * flops.hidden * self.check_k) if self.check_k else None
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.probe = float(flops.probe(1))
        self.adapter_flops = {int(l): float(f) for l, f in (adapter_flops or {}).items()}
        self.layers = [int(l) for l in traces.layers]
        self.col = {l: j for j, l in enumerate(self.layers)}
        self.L = int(self.layers[-1])
        if flops.num_layers != self.L:
            raise ValueError(f"traces end at layer {self.L} but the FLOPs model has {flops.num_layers} layers")
        self.conf = np.asarray(traces.conf_for(None if check_head in (None, "full") else check_head)
                               if check_head not in (None, "full") and traces.check_conf else traces.conf,
                               dtype=np.float32)
        self.static_check = float(2 * flops.hidden * self.static_n) if self.static_n else None
        self.agree = np.asarray(traces.agrees(), dtype=bool)
        self.accounting = accounting
        seq = np.asarray(traces.sequence)
        n = len(seq)
        self.first = np.ones(n, dtype=bool)
        self.first[1:] = seq[1:] != seq[:-1]
        context = np.asarray(traces.context, dtype=np.int64)  # keys of the pass producing the token = t + 1
        self.kv = context
        # Cost of processing q positions in one layer at kv length t+1 is q * (linear + attn * (t+1)).
        self.per_query = (flops.layer_linear + 4 * flops.q_dim * context).astype(np.float64)
        self.head = float(flops.head(1))
        self.kv_projection = float(flops.kv_projection(1))
        self.n = n
        not_first = ~self.first
        if accounting == "none":
            self.flops_full = float(self.L * (context * self.per_query).sum() + n * self.head)
        else:
            self.flops_full = float(self.L * self.per_query[not_first].sum() + n * self.head)
        # For catch-up: index of each token's predecessor in its sequence (-1 for first tokens).
        self._idx = np.arange(n)
        # Batch groups: sequences b at a time, one group per (batch, step within the sequence).
        starts = np.maximum.accumulate(np.where(self.first, self._idx, 0))
        step = self._idx - starts
        seq_rank = np.cumsum(self.first) - 1
        key = (seq_rank // self.batch_size) * (int(step.max()) + 1 if n else 1) + step
        _, self._group = np.unique(key, return_inverse=True)

    # -------------------------------------------------------------------------------------------- rules
    def threshold_exits(self, thresholds: Mapping[int, float]) -> tuple[np.ndarray, np.ndarray]:
        """(exit column (N,), head checks (N,)) under the confidence policy with these thresholds."""
        checked = sorted(int(l) for l in thresholds if int(l) < self.L)
        missing = [l for l in checked if l not in self.col]
        if missing:
            raise ValueError(f"layers {missing} were not traced (traced: {self.layers[:-1]})")
        cols = [self.col[l] for l in checked]
        fires = np.stack([self.conf[:, self.col[l]] >= np.float32(thresholds[l]) for l in checked], axis=1) \
            if checked else np.zeros((self.n, 0), dtype=bool)
        return self._first_exit(cols, fires)

    def decision_exits(self, decisions: np.ndarray, layers: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Same for an arbitrary rule given as (N, len(layers)) bool "exit here" (e.g. the AdaInfer classifier)."""
        order = np.argsort(layers)
        layers = [int(layers[i]) for i in order]
        return self._first_exit([self.col[l] for l in layers], np.asarray(decisions, dtype=bool)[:, order])

    def _first_exit(self, cols: list[int], fires: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        full = np.concatenate([fires, np.ones((self.n, 1), dtype=bool)], axis=1)
        k = full.argmax(axis=1)  # index of the first firing check (the final layer always fires)
        col_of = np.array([*cols, len(self.layers) - 1])
        return col_of[k], k + 1

    # ------------------------------------------------------------------------------------------ scoring
    def score(self, thresholds: Mapping[int, float]) -> Score:
        checked = sorted(int(l) for l in thresholds if int(l) < self.L)
        return self.score_exits(*self.threshold_exits(thresholds), num_checked=len(checked), checked_layers=checked)

    def oracle(self, layers: Sequence[int] | None = None) -> Score:
        """The ceiling of these exits: every token leaves at the first of ``layers`` (default: every traced exit)
        whose top-1 equals the final layer's, decided for free (no check FLOPs, one head per token)."""
        layers = [int(l) for l in (layers if layers is not None else self.layers[:-1])]
        cols = [self.col[l] for l in sorted(layers)]
        fires = self.agree[:, cols] if cols else np.zeros((self.n, 0), dtype=bool)
        exit_col, _ = self._first_exit(cols, fires)
        layer_of = np.array(self.layers)[exit_col]
        flops = float(self._layer_flops(layer_of) + self.n * self.head)
        share = {l: float((layer_of == l).mean()) for l in sorted(set(layer_of.tolist()))}
        return Score(flops / self.flops_full, 1.0, float(layer_of.mean()), 0.0, share, flops, self.flops_full)

    def score_exits(self, exit_col: np.ndarray, checks: np.ndarray, num_checked: int | None = None,
                    checked_layers: Sequence[int] | None = None) -> Score:
        """``checked_layers``: the intermediate layers checked, in order (default: every traced one)."""
        layer_of = np.array(self.layers)[exit_col]
        agreement = float(self.agree[np.arange(self.n), exit_col].mean())
        flops = self.flops_of(layer_of, checks, num_checked, checked_layers)
        share = {l: float((layer_of == l).mean()) for l in sorted(set(layer_of.tolist()))}
        return Score(flops / self.flops_full, agreement, float(layer_of.mean()), float(checks.mean()), share, flops,
                     self.flops_full)

    def flops_of(self, exit_layer: np.ndarray, checks: np.ndarray, num_checked: int | None = None,
                 checked_layers: Sequence[int] | None = None) -> float:
        """Decode FLOPs of the traced tokens given each one's exit layer and number of checks (the final layer's
        counted as one; ``num_checked``: intermediate layers checked, needed for probe pricing; ``checked_layers``:
        which, in order, for adapter pricing)."""
        checks = np.asarray(checks)
        adapter_flops = 0.0
        if self.adapter_flops:
            order = list(self.layers[:-1]) if checked_layers is None else [int(l) for l in checked_layers]
            # Cost of the adapters a token ran: those of its first ``checks`` checks (the final layer has none).
            per_check = np.cumsum([0.0, *(self.adapter_flops.get(l, 0.0) for l in order), 0.0])
            adapter_flops = float(per_check[np.minimum(checks, len(order) + 1)].sum())
        if self.check == "head" and self.static_n is not None:
            # N head rows at every intermediate check up to the exit, the full head once (at the exit).
            m = len(self.layers) - 1 if num_checked is None else int(num_checked)
            check_flops = np.minimum(checks, m).sum() * self.static_check + len(checks) * self.head
        elif self.check == "head" and self.check_k is not None:
            # The first check is a full head (it picks the candidates); later ones score K rows.
            check_flops = len(checks) * self.head + (checks - 1).sum() * self.candidate
        elif self.check == "head":
            check_flops = checks.sum() * self.head
        else:  # probes at every checked layer up to the exit, the head once
            m = len(self.layers) - 1 if num_checked is None else int(num_checked)
            check_flops = np.minimum(checks, m).sum() * self.probe + len(checks) * self.head
        exit_layer = np.asarray(exit_layer)
        if self.batch_size > 1:  # the batch rule: every row of a step runs to the deepest exit among them
            deepest = np.zeros(int(self._group.max()) + 1, dtype=exit_layer.dtype)
            np.maximum.at(deepest, self._group, exit_layer)
            exit_layer = deepest[self._group]
        return float(check_flops + adapter_flops + self._layer_flops(exit_layer))

    def _layer_flops(self, exit_layer: np.ndarray) -> float:
        not_first = ~self.first
        if self.accounting == "none":
            return float((exit_layer * self.kv * self.per_query).sum())
        if self.accounting in ("per-token", "propagate"):
            total = float((exit_layer[not_first] * self.per_query[not_first]).sum())
            if self.accounting == "propagate":
                total += float((self.L - exit_layer[not_first]).sum()) * self.kv_projection
            return total
        # recompute: layers between two consecutive checkpoints see the same set of passes, so group them.
        total = 0.0
        bounds = sorted(set(exit_layer[not_first].tolist()) | {0})
        t = self.kv - 1  # position each pass processes (for first tokens: the prompt's last position)
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            reach = not_first & (exit_layer >= hi)  # passes that run layers lo+1..hi
            anchor = reach | self.first  # a sequence's first token stands for the prefill (caught up to P-1)
            last = np.maximum.accumulate(np.where(anchor, self._idx, -1))
            prev = np.empty_like(last)
            prev[0] = -1
            prev[1:] = last[:-1]
            rows = np.nonzero(reach)[0]
            q = t[rows] - t[prev[rows]]  # positions this pass carries through these layers
            total += (hi - lo) * float((q * self.per_query[rows]).sum())
        return total
