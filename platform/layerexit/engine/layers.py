"""A decoder layer for decoding, with its Q/K/V and gate/up projections fused into one matrix product each.

At batch 1 a decode step is one matrix-vector product per weight matrix, and on a CPU each call has a fixed cost
comparable to the product itself for SmolLM2's small matrices (576 x 192 for K and V). Seven calls per layer
become four. The fused matrices are copies (the model's own parameters are left alone, so training, saving and
moving the model are unaffected); ``fuse_layers`` makes them only while they stay under a memory budget
(SmolLM2: ~140 MB in bf16; a 7B model would need ~9 GB and keeps the stock layers).

The attention itself is transformers' own attention function for the model's implementation (sdpa or eager),
called as ``LlamaAttention.forward`` calls it, so the arithmetic is the same apart from the fused products.
Models whose layers do not have the LLaMA layout (a q/k norm, other attribute names) keep the stock layer.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


FUSED_BYTES_BUDGET = 512 * 2**20  # extra memory the fused copies may take


def _fuse(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several linears on the same input (a copy)."""
    with torch.no_grad():
        weight = torch.cat([l.weight for l in linears], dim=0).contiguous()
        biases = [l.bias for l in linears]
        if any(b is not None for b in biases) and not all(b is not None for b in biases):
            raise ValueError("some projections have a bias and some do not")
        bias = torch.cat(biases).contiguous() if biases[0] is not None else None
    return weight, bias


def check_llama_layout(layer: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(self_attn, mlp) of a decoder layer with LLaMA's layout, or ValueError naming what differs (the engine's
    own layer forwards, fused and compiled, implement that layout only)."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None:
        raise ValueError("decoder layers have no self_attn / mlp")
    if getattr(attn, "q_norm", None) is not None or getattr(attn, "k_norm", None) is not None:
        raise ValueError("q/k norms are not handled")
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if not isinstance(getattr(attn, name, None), nn.Linear):
            raise ValueError(f"self_attn.{name} is not a Linear")
    for name in ("gate_proj", "up_proj", "down_proj"):
        if not isinstance(getattr(mlp, name, None), nn.Linear):
            raise ValueError(f"mlp.{name} is not a Linear")
    return attn, mlp


class FusedLayer:
    """Decoder layer ``layer`` with fused projections; call it like the stock layer in the engine."""

    def __init__(self, layer: nn.Module) -> None:
        attn, mlp = check_llama_layout(layer)
        self.layer, self.attn, self.mlp = layer, attn, mlp
        self.sizes = [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]
        self.qkv_w, self.qkv_b = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        self.inter = mlp.gate_proj.out_features
        self.gu_w, self.gu_b = _fuse([mlp.gate_proj, mlp.up_proj])
        self.head_dim = attn.head_dim

    def __call__(self, h: torch.Tensor, mask, pos: torch.Tensor, rope, cache) -> torch.Tensor:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

        layer, attn = self.layer, self.attn
        B, n, _ = h.shape
        residual = h
        x = layer.input_layernorm(h)
        qkv = nn.functional.linear(x, self.qkv_w, self.qkv_b)  # Shape: (B, n, q + 2 * kv)
        q, k, v = qkv.split(self.sizes, dim=-1)
        shape = (B, n, -1, self.head_dim)
        q, k, v = q.reshape(shape).transpose(1, 2), k.reshape(shape).transpose(1, 2), v.reshape(shape).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, attn.layer_idx)
        fn = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
        out, _ = fn(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling)
        out = attn.o_proj(out.reshape(B, n, -1).contiguous())
        h = residual + out
        residual = h
        x = layer.post_attention_layernorm(h)
        gu = nn.functional.linear(x, self.gu_w, self.gu_b)  # Shape: (B, n, 2 * intermediate)
        gate, up = gu.split([self.inter, self.inter], dim=-1)
        return residual + self.mlp.down_proj(self.mlp.act_fn(gate) * up)


def fuse_layers(layers: nn.ModuleList, budget: int = FUSED_BYTES_BUDGET) -> list[FusedLayer] | None:
    """Fused decode layers for every layer, or None (with the reason logged) when the layout is not LLaMA's or
    the copies would take more than ``budget`` bytes."""
    try:
        extra = 0
        for layer in layers:
            for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
                w = layer.get_submodule(name).weight
                extra += w.numel() * w.element_size()
        if extra > budget:
            logger.info("fused projections off: they would take %.0f MB more (budget %.0f MB)", extra / 2**20,
                        budget / 2**20)
            return None
        return [FusedLayer(layer) for layer in layers]
    except (ValueError, AttributeError) as err:
        logger.info("fused projections off: %s", err)
        return None
