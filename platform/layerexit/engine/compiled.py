"""A static-shape, ``torch.compile``d decode path: layer segments between exit points, the k+1-column
verification of drafts, and the EAGLE-3 draft layer (opt-in).

An eager decode step on a CPU spends much of its time in Python and op dispatch (SmolLM2: ~25 small ops per
layer, 30 layers), and on a GPU in kernel launches. The eager cache (``ExitKVCache.update``) slices its buffers
with Python ints, so every step has new shapes and nothing can be compiled or captured in a CUDA graph.

This module runs n new columns at columns t..t+n-1 through layers whose cache holds exactly columns 0..t-1 (n = 1:
a decode step or a layer draft's column; n = k+1: the verification of k drafts) with shapes that do not change
from step to step: K/V are written into the preallocated buffers with ``index_copy_`` at a position tensor, and
attention reads each buffer's whole width under a boolean mask (each query's valid columns up to itself). The
buffers' width (it changes when rows join, widen or compact) is marked dynamic, so one graph serves every width;
so are the batch (rows leave as they finish: one graph for 1 row, one for 2 or more) and the column count of a
verification (one graph for every k >= 1). A segment is the layers from one exit point to the next (the policy asks
for hidden states only there), compiled as one callable that can also return the hidden states after chosen layers
(an EAGLE-3 draft's aux features, captured during verification at no extra layer): inductor on a CPU,
``reduce-overhead`` (CUDA graphs) on a GPU. The EAGLE-3 draft layer (``draft_layer``) is one more static function,
compiled the same way, writing its K/V into its own cache layer. Prefill and recompute catch-up passes stay eager.

Compilation is lazy (on first use) and can never fail a generation: if compiling or a compiled call raises, the
reason is logged once and the engine decodes eager from then on. ``compile_seconds`` is the wall time of the calls
that compiled a graph (dynamo's graph counter moved), so a caller can warm every shape before timing and check that
nothing compiled afterwards. In float32 the compiled step gives eager's tokens (tested); in bfloat16 inductor keeps
fused intermediates in float32, so near-ties can flip (measured).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from layerexit.engine.static import (  # noqa: F401 - StepInputs, static_inputs, draft_layer: re-exported
    StepInputs,
    _check_layout,
    _layer_weights,
    _segment,
    _Spec,
    draft_layer,
    static_inputs,
)

if TYPE_CHECKING:
    from layerexit.engine.cache import ExitKVCache
# ``engine`` below is an EarlyExitEngine (engine/decode.py), named in annotations only: decode.py imports this
# module, never the other way (no import circle).

logger = logging.getLogger(__name__)

# Graphs per compiled function (shared by the engines of a process): one per (segment length, captured layers,
# 1 row or more, 1 column or more, dtype). A policy checking every 4th layer needs a handful; a recompute catch-up
# that leaves only part of a segment at length t adds shorter ones. Past the limit a new shape runs eager
# (compiled shapes stay compiled).
RECOMPILE_LIMIT = 32


def _graphs() -> int:
    """Graphs dynamo has compiled in this process (a call that moved it compiled)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def _mark_dynamic(batch: Sequence[tuple[torch.Tensor, int]], columns: Sequence[tuple[torch.Tensor, int]],
                  width: Sequence[tuple[torch.Tensor, int]], b: int, n: int) -> None:
    """One graph for every width, for every batch of 2 or more rows and for every count of 2 or more columns (1 row
    and 1 column stay specialised: a single decode step is the hot path)."""
    for tensor, dim in width:
        torch._dynamo.maybe_mark_dynamic(tensor, dim)
    if b > 1:
        for tensor, dim in batch:
            torch._dynamo.maybe_mark_dynamic(tensor, dim)
    if n > 1:
        for tensor, dim in columns:
            torch._dynamo.maybe_mark_dynamic(tensor, dim)


class CompiledDecode:
    """The engine's compiled static-shape passes. ``run`` advances as far as it can and says how far it got; the
    caller runs whatever is left (and everything after a failure) eager."""

    def __init__(self, engine: "EarlyExitEngine") -> None:
        self.engine = engine
        self.cuda = engine.device.type == "cuda"
        self.failed: str | None = None  # why compiled decoding is off (logged once)
        self.compile_seconds = 0.0  # wall time of the calls that compiled a graph
        self.graphs = 0  # graphs this engine's calls compiled (0 when another engine compiled the same shapes)
        self.calls = 0  # compiled calls that ran
        self._fn = None
        self._draft_fn = None
        self._over_limit = False  # a shape past RECOMPILE_LIMIT was met (logged once)
        try:
            self.spec = _check_layout(engine)
            fused = engine.fused or [None] * engine.L
            self.weights = [_layer_weights(layer, f) for layer, f in zip(engine.parts.layers, fused)]
        except (ValueError, AttributeError) as err:
            self._fail(f"this model's layout is not supported ({err})")
            return
        if self.cuda:
            # CUDA graphs replay fixed addresses: weights never move, so they are not copied in on every replay.
            for w in self.weights:
                for t in _tensors(w):
                    torch._dynamo.mark_static_address(t)

    @property
    def active(self) -> bool:
        return self.failed is None

    def _fail(self, reason: str) -> None:
        self.failed = reason
        logger.warning("torch.compile decode path off, decoding eager: %s", reason)

    def step_inputs(self, h: torch.Tensor, valid: torch.Tensor, pos: torch.Tensor, t: int) -> StepInputs:
        """The shared inputs of a pass at columns t..t+n-1 (h: (B, n, H), valid: (B, W), pos: (B, n))."""
        return static_inputs(self.engine, h, valid, pos, t)

    def _call(self, attr: str, python_fn, args: tuple):
        """``python_fn`` compiled (once, kept in ``attr``) on ``args``; None when this call must run eager."""
        try:
            fn = getattr(self, attr)
            if fn is None:
                fn = torch.compile(python_fn, mode="reduce-overhead" if self.cuda else None, fullgraph=True,
                                   recompile_limit=RECOMPILE_LIMIT)
                setattr(self, attr, fn)
            graphs = _graphs()
            t0 = time.perf_counter()
            if self.cuda:
                # Every call may replay over the previous call's output buffers: callers get copies.
                torch.compiler.cudagraph_mark_step_begin()
            out = fn(*args)
            if self.cuda:
                out = torch.utils._pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, out)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            if not self._over_limit:
                self._over_limit = True
                logger.warning("torch.compile decode path: %d graphs compiled; new shapes run eager",
                               RECOMPILE_LIMIT)
            return None
        except Exception as err:  # noqa: BLE001 -- any compiler/runtime failure: eager from now on, never a wrong token
            self._fail(f"{type(err).__name__}: {err}".splitlines()[0][:300])
            return None
        self.calls += 1
        if _graphs() > graphs:
            self.graphs += _graphs() - graphs
            self.compile_seconds += time.perf_counter() - t0
        return out

    def run(self, first: int, last: int, h: torch.Tensor, s: StepInputs, cache: "ExitKVCache", t: int,
            capture: Sequence[int] = (), captured: dict[int, torch.Tensor] | None = None
            ) -> tuple[torch.Tensor, int]:
        """Layers first..m (1-based) on h (B, n, H) at columns t..t+n-1, m <= last the deepest layer up to which every
        cache length is t; returns (hidden after layer m, m). m = first - 1 when nothing ran (compiled decoding
        off, or layer ``first`` needs a catch-up first). The hidden states after the layers in ``capture`` that ran
        go into ``captured``."""
        m = first - 1
        while m < last and cache.lengths[m] == t:
            m += 1
        if m < first or not self.active:
            return h, first - 1
        B, n = h.shape[0], h.shape[1]
        kbufs, vbufs = cache.keys[first - 1 : m], cache.values[first - 1 : m]
        bufs = (*kbufs, *vbufs)  # Shape: (B, kv, W, d)
        # The buffers widen, compact and take joining rows between steps: one graph for every width.
        _mark_dynamic([(h, 0), (s.cos, 0), (s.sin, 0), (s.mask, 0), *((b, 0) for b in bufs)],
                      [(h, 1), (s.cos, 1), (s.sin, 1), (s.mask, 2), (s.index, 0)],
                      [(s.mask, 3), *((b, 2) for b in bufs)], B, n)
        if self.cuda:
            for buf in bufs:
                torch._dynamo.mark_static_address(buf)  # written in place: a re-record, not a copy, when it moves
        local = tuple(sorted(a - first for a in capture if first <= a <= m))
        out = self._call("_fn", _segment, (h, s, self.weights[first - 1 : m], kbufs, vbufs, self.spec, local))
        if out is None:
            return h, first - 1
        h, extra = out
        if captured is not None:
            for i, hidden in zip(local, extra):
                captured[first + i] = hidden
        cache.advance(first - 1, m, t + n)
        return h, m

    def run_draft(self, args: tuple) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``draft_layer(*args)`` compiled (None: run it eager)."""
        if not self.active:
            return None
        tokens, hidden, s, last, _w, kbuf, vbuf, _spec, _fuse = args
        B, n = tokens.shape
        _mark_dynamic([(tokens, 0), (hidden, 0), (s.cos, 0), (s.sin, 0), (s.mask, 0), (kbuf, 0), (vbuf, 0),
                       *(((last, 0),) if last is not None else ())],
                      [(tokens, 1), (hidden, 1), (s.cos, 1), (s.sin, 1), (s.mask, 2), (s.index, 0)],
                      [(s.mask, 3), (kbuf, 2), (vbuf, 2)], B, n)
        if self.cuda:
            for buf in (kbuf, vbuf):
                torch._dynamo.mark_static_address(buf)
        return self._call("_draft_fn", draft_layer, args)


def _tensors(w: tuple) -> list[torch.Tensor]:
    """The tensors in a layer's weight tuple (nested tuples, Nones skipped)."""
    out = []
    for item in w:
        if isinstance(item, tuple):
            out.extend(x for x in item if x is not None)
        elif item is not None:
            out.append(item)
    return out
