"""Static-shape LLaMA layer functions and their shared inputs: what the compiled decode path (``engine/compiled.py``)
compiles, the decode loop builds its step inputs with (``static_inputs``), and the EAGLE-3 feature drafter runs
(``draft_layer``). Pure functions of tensors (and of an engine's ``rope``/layout where named): no compilation here.

n new columns at columns t..t+n-1 run through layers whose cache holds exactly columns 0..t-1 with shapes that do
not change from step to step: K/V are written into preallocated buffers with ``index_copy_`` at a position tensor,
and attention reads each buffer's whole width under a boolean mask (each query's valid columns up to itself).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from layerexit.engine.layers import check_llama_layout

# ``engine`` below is an EarlyExitEngine (engine/decode.py), named in annotations only (no import circle).


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
