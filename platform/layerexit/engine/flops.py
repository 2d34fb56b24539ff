"""Exact matmul FLOPs of what the engine computes, from the model config.

A multiply-add counts 2 FLOPs, as ``torch.utils.flop_counter.FlopCounterMode`` counts them. Norms, rotary
embeddings, softmax and other element-wise work are not counted (FlopCounterMode does not count them either).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FlopsModel:
    """Per-position costs of one decoder layer, the LM head, and K/V propagation."""

    hidden: int
    q_dim: int  # heads * head_dim
    kv_dim: int  # kv_heads * head_dim
    intermediate: int
    vocab: int
    num_layers: int
    mlp_matrices: int = 3  # gate, up, down (SwiGLU)

    @classmethod
    def from_config(cls, config) -> "FlopsModel":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(
            hidden=config.hidden_size,
            q_dim=config.num_attention_heads * head_dim,
            kv_dim=kv_heads * head_dim,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
            num_layers=config.num_hidden_layers,
        )

    @property
    def layer_linear(self) -> int:
        """Projections and MLP of one layer for one position."""
        h = self.hidden
        return 2 * h * (self.q_dim + 2 * self.kv_dim) + 2 * self.q_dim * h + 2 * self.mlp_matrices * h * self.intermediate

    def layer(self, queries: int, kv_len: int) -> int:
        """One decoder layer for ``queries`` positions attending over ``kv_len`` keys (QK^T and AV)."""
        return queries * self.layer_linear + 4 * self.q_dim * queries * kv_len

    def head(self, positions: int = 1) -> int:
        """LM-head evaluations (final norm not counted)."""
        return 2 * self.hidden * self.vocab * positions

    def probe(self, positions: int = 1) -> int:
        """A linear probe on the hidden state (the ``probe`` policy's exit check)."""
        return 2 * self.hidden * positions

    def kv_projection(self, positions: int = 1) -> int:
        """K and V projections only (CALM-style propagation to a skipped layer)."""
        return 4 * self.hidden * self.kv_dim * positions

    def head_in_layers(self) -> float:
        """How many decoder layers (at short context) one LM-head evaluation costs."""
        return self.head() / self.layer_linear
