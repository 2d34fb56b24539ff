"""A static-shape, ``torch.compile``d decode step for the layer segments between exit points (opt-in).

An eager decode step on a CPU spends much of its time in Python and op dispatch (SmolLM2: ~25 small ops per
layer, 30 layers), and on a GPU in kernel launches. The eager cache (``ExitKVCache.update``) slices its buffers
with Python ints, so every step has new shapes and nothing can be compiled or captured in a CUDA graph.

This module runs the common decode step -- ONE new column at column t through layers whose cache holds exactly
columns 0..t-1 -- with shapes that do not change from step to step: K/V are written into the preallocated
buffers with ``index_copy_`` at a position tensor, and attention reads each buffer's whole width under a boolean
mask (the row's valid columns up to t). The buffers' width (it changes when rows join, widen or compact) is
marked dynamic, so one graph serves every width. A segment is the layers from one exit point to the next (the
policy asks for hidden states only there), compiled as one callable: inductor on a CPU, ``reduce-overhead``
(CUDA graphs) on a GPU. Self-speculative layer drafts are single columns too and use it. Catch-up passes (n > 1),
prefill and speculative verification stay eager.

Compilation is lazy (on first use) and can never fail a generation: if compiling or a compiled call raises, the
reason is logged once and the engine decodes eager from then on. In float32 the compiled step gives eager's
tokens (tested); in bfloat16 inductor keeps fused intermediates in float32, so near-ties can flip (measured).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from layerexit.engine.layers import check_llama_layout

if TYPE_CHECKING:
    from layerexit.engine.cache import ExitKVCache
    from layerexit.engine.decode import EarlyExitEngine

logger = logging.getLogger(__name__)

# Graphs of the segment function (shared by the engines of a process): one per (segment length, batch of 1 or
# more, dtype). A policy checking every 4th layer needs a handful; a recompute catch-up that leaves only part of
# a segment at length t adds shorter ones. Past the limit a new shape runs eager (compiled shapes stay compiled).
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
    """What every layer of one decode step shares: RoPE of column t, the attention mask, the write position."""

    cos: torch.Tensor  # (B, 1, head_dim)
    sin: torch.Tensor  # (B, 1, head_dim)
    mask: torch.Tensor  # (B, 1, 1, W) bool: valid columns <= t
    index: torch.Tensor  # (1,) long: t


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


def _static_layer(h: torch.Tensor, s: StepInputs, w: tuple, kbuf: torch.Tensor, vbuf: torch.Tensor,
                  spec: _Spec) -> torch.Tensor:
    """One decoder layer on the column at ``s.index`` (h: (B, 1, H)), writing its K/V into the buffers."""
    ln1, qkv_w, qkv_b, o_w, o_b, ln2, gu_w, gu_b, down_w, down_b = w
    B = h.shape[0]
    x = _rms(h, ln1, spec.eps)
    q, k, v = _linears(x, qkv_w, qkv_b).split(spec.qkv_sizes, dim=-1)  # Shape: (B, 1, heads*d), 2x (B, 1, kv*d)
    q = q.view(B, spec.heads, spec.head_dim)
    k = k.view(B, spec.kv_heads, 1, spec.head_dim)
    v = v.view(B, spec.kv_heads, 1, spec.head_dim)
    cos, sin = s.cos, s.sin  # Shape: (B, 1, d): broadcast over heads
    q = q * cos + _rotate_half(q) * sin
    k = k * cos[:, :, None] + _rotate_half(k) * sin[:, :, None]
    kbuf.index_copy_(2, s.index, k)  # Shape: kbuf (B, kv, W, d)
    vbuf.index_copy_(2, s.index, v)
    # Grouped-query attention without copying K/V per head: query head i reads K/V head i // groups, as
    # transformers' repeat_kv orders them. Scores and softmax in float32, like the eager/sdpa kernels.
    groups = spec.heads // spec.kv_heads
    qg = q.view(B, spec.kv_heads, groups, spec.head_dim).float()
    scores = (qg @ kbuf.float().transpose(-1, -2)) * spec.scaling  # Shape: (B, kv, groups, W)
    scores = scores.masked_fill(~s.mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    out = (probs @ vbuf.float()).to(h.dtype)  # Shape: (B, kv, groups, d)
    h = h + F.linear(out.reshape(B, 1, spec.heads * spec.head_dim), o_w, o_b)
    x = _rms(h, ln2, spec.eps)
    gate, up = _linears(x, gu_w, gu_b).split([spec.inter, spec.inter], dim=-1)
    return h + F.linear(F.silu(gate) * up, down_w, down_b)


def _segment(h: torch.Tensor, s: StepInputs, weights: list[tuple], kbufs: list[torch.Tensor],
             vbufs: list[torch.Tensor], spec: _Spec) -> torch.Tensor:
    """Consecutive layers on one new column: what gets compiled (one graph per segment length)."""
    for w, kb, vb in zip(weights, kbufs, vbufs):
        h = _static_layer(h, s, w, kb, vb, spec)
    return h


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


class CompiledDecode:
    """The engine's compiled single-column step. ``run`` advances as far as it can and says how far it got; the
    caller runs whatever is left (and everything after a failure) eager."""

    def __init__(self, engine: "EarlyExitEngine") -> None:
        self.engine = engine
        self.cuda = engine.device.type == "cuda"
        self.failed: str | None = None  # why compiled decoding is off (logged once)
        self.compile_seconds = 0.0  # wall time of the calls that compiled (first call per segment length)
        self._fn = None
        self._seen: set[tuple[int, int]] = set()  # (segment length, batch) shapes already compiled
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
        """The shared inputs of a step at column t (h: (B, 1, H), valid: (B, W), pos: (B, 1) RoPE positions)."""
        cos, sin = self.engine.rope(h, pos)
        width = valid.shape[1]
        mask = valid & (torch.arange(width, device=valid.device) <= t)
        mask = mask[:, None, None, :]  # Shape: (B, 1, 1, W)
        torch._dynamo.maybe_mark_dynamic(mask, 3)
        return StepInputs(cos, sin, mask, torch.tensor([t], device=valid.device))

    def run(self, first: int, last: int, h: torch.Tensor, s: StepInputs, cache: "ExitKVCache", t: int
            ) -> tuple[torch.Tensor, int]:
        """Layers first..m (1-based) on h (B, 1, H) at column t, m <= last the deepest layer up to which every
        cache length is t; returns (hidden after layer m, m). m = first - 1 when nothing ran (compiled decoding
        off, or layer ``first`` needs a catch-up first)."""
        m = first - 1
        while m < last and cache.lengths[m] == t:
            m += 1
        if m < first or not self.active:
            return h, first - 1
        kbufs, vbufs = cache.keys[first - 1 : m], cache.values[first - 1 : m]
        for buf in (*kbufs, *vbufs):
            # One graph for every width: the buffers widen, compact and take joining rows between steps.
            torch._dynamo.maybe_mark_dynamic(buf, 2)  # Shape: (B, kv, W, d)
            if self.cuda:
                torch._dynamo.mark_static_address(buf)  # written in place: a re-record, not a copy, when it moves
        key = (m - first + 1, h.shape[0])
        t0 = time.perf_counter()
        try:
            if self._fn is None:
                self._fn = torch.compile(_segment, mode="reduce-overhead" if self.cuda else None, fullgraph=True,
                                         recompile_limit=RECOMPILE_LIMIT)
            if self.cuda:
                # Every call may replay over the previous call's output buffers: callers get a copy (B x H).
                torch.compiler.cudagraph_mark_step_begin()
            out = self._fn(h, s, self.weights[first - 1 : m], kbufs, vbufs, self.spec)
            if self.cuda:
                out = out.clone()
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            if not self._over_limit:
                self._over_limit = True
                logger.warning("torch.compile decode path: %d graphs compiled; new segment shapes run eager",
                               RECOMPILE_LIMIT)
            return h, first - 1
        except Exception as err:  # noqa: BLE001 -- any compiler/runtime failure: eager from now on, never a wrong token
            self._fail(f"{type(err).__name__}: {err}".splitlines()[0][:300])
            return h, first - 1
        if key not in self._seen:
            self._seen.add(key)
            self.compile_seconds += time.perf_counter() - t0
        cache.advance(first - 1, m, t + 1)
        return out, m


def _tensors(w: tuple) -> list[torch.Tensor]:
    """The tensors in a layer's weight tuple (nested tuples, Nones skipped)."""
    out = []
    for item in w:
        if isinstance(item, tuple):
            out.extend(x for x in item if x is not None)
        elif item is not None:
            out.append(item)
    return out
