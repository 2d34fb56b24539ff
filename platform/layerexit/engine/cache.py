"""A preallocated per-layer KV cache whose layers may hold different lengths.

Early exit leaves deep layers behind shallow ones (a token that exits at layer 8 is in layers 1..8 only), so
each layer keeps its own length. Buffers are allocated once for the whole generation, so appending costs no
copy of the past (transformers' DynamicCache concatenates on every step). It implements the one method the
attention modules of LLaMA/Mistral/Qwen2 call: ``update(key, value, layer_idx)``.
"""

from __future__ import annotations

import torch


class ExitKVCache:
    """Keys/values of shape (B, kv_heads, max_len, head_dim) per layer, with a length per layer."""

    is_compileable = False

    def __init__(self, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        shape = (batch, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = [0] * num_layers

    # transformers' attention calls this with the 0-based layer index.
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        start = self.lengths[layer_idx]
        end = start + key_states.shape[-2]
        self.keys[layer_idx][:, :, start:end] = key_states
        self.values[layer_idx][:, :, start:end] = value_states
        self.lengths[layer_idx] = end
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def advance(self, first_idx: int, last_idx: int, end: int) -> None:
        """Layers first_idx..last_idx-1 (0-based) now hold columns < ``end``: the compiled step
        (``engine/compiled.py``) wrote them in place with ``index_copy_``, so only the lengths move here."""
        for i in range(first_idx, last_idx):
            self.lengths[i] = end

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def crop(self, length: int) -> None:
        """Forget everything at positions >= ``length`` in every layer."""
        self.lengths = [min(l, length) for l in self.lengths]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (finished sequences leave the batch)."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]

    def widen(self, max_len: int) -> None:
        """Room for positions up to ``max_len`` (a joining request may need more than the batch had)."""
        for store in (self.keys, self.values):
            for i, buf in enumerate(store):
                extra = max_len - buf.shape[2]
                if extra > 0:
                    store[i] = torch.cat([buf, buf.new_zeros((*buf.shape[:2], extra, buf.shape[3]))], dim=2)

    def extend(self, other: "ExitKVCache") -> None:
        """Append ``other``'s rows (same layers, width and lengths: rows joining a running batch)."""
        if other.lengths != self.lengths:
            raise ValueError(f"cannot join caches with lengths {other.lengths} and {self.lengths}")
        self.keys = [torch.cat([a, b]) for a, b in zip(self.keys, other.keys)]
        self.values = [torch.cat([a, b]) for a, b in zip(self.values, other.values)]

    def layer_kv(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.lengths[layer_idx]
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]
