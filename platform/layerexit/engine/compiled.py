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
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from layerexit.engine.layers import check_llama_layout

if TYPE_CHECKING:
    from layerexit.engine.cache import ExitKVCache
    from layerexit.engine.decode import EarlyExitEngine

logger = logging.getLogger(__name__)

# Graphs per compiled function (shared by the engines of a process): one per (segment length, captured layers,
# 1 row or more, 1 column or more, dtype). A policy checking every 4th layer needs a handful; a recompute catch-up
# that leaves only part of a segment at length t adds shorter ones. Past the limit a new shape runs eager
# (compiled shapes stay compiled).
RECOMPILE_LIMIT = 32


class _Spec(NamedTuple):
    """Per-model constants the compiled function specializes on (guarded by value, so every engine over the
    same architecture shares one compiled graph per segment length)."""

    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    scaling: float
    qkv_sizes: tuple[int, int, int]
    inter: int


class StepInputs(NamedTuple):
    """What every layer of one pass over columns t..t+n-1 shares: RoPE, the attention mask, the write positions."""

    cos: torch.Tensor  # (B, n, head_dim)
    sin: torch.Tensor  # (B, n, head_dim)
    mask: torch.Tensor  # (B, 1, n, W) bool: query i sees the valid columns <= t + i (and itself)
    index: torch.Tensor  # (n,) long: t..t+n-1


def static_inputs(engine: "EarlyExitEngine", h: torch.Tensor, valid: torch.Tensor, pos: torch.Tensor, t: int,
                  rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> StepInputs:
    """The shared inputs of a pass over columns t..t+n-1 (h: (B, n, H), valid: (B, W), pos: (B, n) RoPE positions;
    ``rope``: (cos, sin) already computed for these positions)."""
    cos, sin = rope if rope is not None else engine.rope(h, pos)
    n, width = h.shape[1], valid.shape[1]
    cols = torch.arange(width, device=valid.device)
    queries = torch.arange(t, t + n, device=valid.device)
    causal = cols[None, :] <= queries[:, None]  # Shape: (n, W)
    mask = (valid[:, None, :] & causal[None]) | (cols[None, :] == queries[:, None])[None]  # a padded query sees itself
    return StepInputs(cos, sin, mask[:, None], queries)


def _rms(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm.forward, as a function of tensors."""
    x = h.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(h.dtype)


def _linears(x: torch.Tensor, weights: tuple, biases: tuple) -> torch.Tensor:
    """One fused projection, or several on the same input concatenated (engines without fused copies)."""
    outs = [F.linear(x, w, b) for w, b in zip(weights, biases)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: StepInputs, kbuf: torch.Tensor,
            vbuf: torch.Tensor, spec: _Spec) -> torch.Tensor:
    """Rotary, the K/V write at ``s.index`` and grouped-query attention over the whole buffer under ``s.mask``.

    Shape: q (B, n, heads*d), k, v (B, n, kv*d), kbuf/vbuf (B, kv, W, d) -> (B, n, heads*d)."""
    B, n = q.shape[0], q.shape[1]
    d = spec.head_dim
    q = q.view(B, n, spec.heads, d).transpose(1, 2)  # Shape: (B, heads, n, d)
    k = k.view(B, n, spec.kv_heads, d).transpose(1, 2)  # Shape: (B, kv, n, d)
    v = v.view(B, n, spec.kv_heads, d).transpose(1, 2)
    cos, sin = s.cos[:, None], s.sin[:, None]  # Shape: (B, 1, n, d): broadcast over heads
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    kbuf.index_copy_(2, s.index, k)
    vbuf.index_copy_(2, s.index, v)
    # Grouped-query attention without copying K/V per head: query head i reads K/V head i // groups, as
    # transformers' repeat_kv orders them. Scores and softmax in float32, like the eager/sdpa kernels.
    groups = spec.heads // spec.kv_heads
    qg = q.reshape(B, spec.kv_heads, groups * n, d).float()
    scores = (qg @ kbuf.float().transpose(-1, -2)) * spec.scaling  # Shape: (B, kv, groups*n, W)
    scores = scores.view(B, spec.kv_heads, groups, n, -1).masked_fill(~s.mask[:, :, None], float("-inf"))
    probs = scores.softmax(dim=-1).view(B, spec.kv_heads, groups * n, -1)
    out = (probs @ vbuf.float()).to(q.dtype)  # Shape: (B, kv, groups*n, d)
    return out.view(B, spec.heads, n, d).transpose(1, 2).reshape(B, n, spec.heads * d)


def _static_layer(h: torch.Tensor, s: StepInputs, w: tuple, kbuf: torch.Tensor, vbuf: torch.Tensor,
                  spec: _Spec) -> torch.Tensor:
    """One decoder layer on the columns at ``s.index`` (h: (B, n, H)), writing their K/V into the buffers."""
    ln1, qkv_w, qkv_b, o_w, o_b, ln2, gu_w, gu_b, down_w, down_b = w
    x = _rms(h, ln1, spec.eps)
    q, k, v = _linears(x, qkv_w, qkv_b).split(spec.qkv_sizes, dim=-1)  # Shape: (B, n, heads*d), 2x (B, n, kv*d)
    h = h + F.linear(_attend(q, k, v, s, kbuf, vbuf, spec), o_w, o_b)
    x = _rms(h, ln2, spec.eps)
    gate, up = _linears(x, gu_w, gu_b).split([spec.inter, spec.inter], dim=-1)
    return h + F.linear(F.silu(gate) * up, down_w, down_b)


def _segment(h: torch.Tensor, s: StepInputs, weights: list[tuple], kbufs: list[torch.Tensor],
             vbufs: list[torch.Tensor], spec: _Spec, capture: tuple[int, ...] = ()
             ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Consecutive layers on n new columns: what gets compiled (one graph per segment length and ``capture``).
    Returns the last hidden state and the hidden states after the segment's layers ``capture`` (0-based)."""
    captured = []
    for i, (w, kb, vb) in enumerate(zip(weights, kbufs, vbufs)):
        h = _static_layer(h, s, w, kb, vb, spec)
        if i in capture:
            captured.append(h)
    return h, tuple(captured)


def draft_layer(tokens: torch.Tensor, hidden: torch.Tensor, s: StepInputs, last: torch.Tensor | None, w: tuple,
                kbuf: torch.Tensor, vbuf: torch.Tensor, spec: _Spec, fuse: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The EAGLE-3 draft (``models/eagle3.py``, vLLM's ``llama_eagle3.py``) on n columns, static-shape: the layer
    over ``[input_layernorm(embed(tokens)); hidden_norm(hidden)]`` with ``hidden`` as the residual, K/V written into
    the draft's cache buffers, then the pruned head's greedy token at one column per row (``last``, or the only one).

    Shape: tokens (B, n); hidden (B, n, A*H) target aux features when ``fuse`` (through ``fc``), else (B, n, H) the
    draft's own previous hidden state; last (B,) column of each row to score (None: n = 1). Returns the draft tokens
    as target ids (B, 1) and the pre-norm hidden state at that column (B, 1, H), fed to the next chained step."""
    embed_w, fc_w, ln_in, ln_hid, qkv_w, o_w, ln2, gu_w, down_w, norm_w, head_w, d2t = w
    if fuse:
        hidden = F.linear(hidden, fc_w)
    x = torch.cat([_rms(F.embedding(tokens, embed_w), ln_in, spec.eps), _rms(hidden, ln_hid, spec.eps)], dim=-1)
    q, k, v = F.linear(x, qkv_w).split(spec.qkv_sizes, dim=-1)
    h = hidden + F.linear(_attend(q, k, v, s, kbuf, vbuf, spec), o_w)
    gate, up = F.linear(_rms(h, ln2, spec.eps), gu_w).split([spec.inter, spec.inter], dim=-1)
    h = h + F.linear(F.silu(gate) * up, down_w)
    if last is not None:
        h = h.gather(1, last.view(-1, 1, 1).expand(-1, 1, h.shape[-1]))  # Shape: (B, 1, H)
    arg = F.linear(_rms(h, norm_w, spec.eps), head_w).argmax(dim=-1)  # Shape: (B, 1) draft ids
    return arg + d2t[arg], h


def _layer_weights(layer: nn.Module, fused) -> tuple:
    """The tensors ``_static_layer`` reads for one stock LLaMA layer (fused Q/K/V and gate/up when the engine
    made fused copies; the separate projections otherwise, so no extra memory is taken)."""
    attn, mlp = layer.self_attn, layer.mlp
    if fused is not None:
        qkv_w, qkv_b = (fused.qkv_w,), (fused.qkv_b,)
        gu_w, gu_b = (fused.gu_w,), (fused.gu_b,)
    else:
        projs = (attn.q_proj, attn.k_proj, attn.v_proj)
        qkv_w, qkv_b = tuple(p.weight for p in projs), tuple(p.bias for p in projs)
        gu_w, gu_b = (mlp.gate_proj.weight, mlp.up_proj.weight), (mlp.gate_proj.bias, mlp.up_proj.bias)
    return (layer.input_layernorm.weight, qkv_w, qkv_b, attn.o_proj.weight, attn.o_proj.bias,
            layer.post_attention_layernorm.weight, gu_w, gu_b, mlp.down_proj.weight, mlp.down_proj.bias)


def _check_layout(engine: "EarlyExitEngine") -> _Spec:
    """The model constants, or ValueError naming what this static step does not implement."""
    cfg = engine.model.config
    if engine.parts.rotary is None:
        raise ValueError("the model has no rotary embedding module")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"activation {cfg.hidden_act!r} (only silu is implemented)")
    layer = engine.parts.layers[0]
    attn, mlp = check_llama_layout(layer)
    heads, kv = cfg.num_attention_heads, engine.kv_heads
    if heads % kv:
        raise ValueError(f"{heads} query heads are not a multiple of {kv} key/value heads")
    return _Spec(heads, kv, engine.head_dim, float(layer.input_layernorm.variance_epsilon), float(attn.scaling),
                 (heads * engine.head_dim, kv * engine.head_dim, kv * engine.head_dim), mlp.gate_proj.out_features)


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
