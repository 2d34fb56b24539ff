"""Exit adapters for the frozen-base recipe: one small module per exit between the exit's hidden state and the
model's shared final norm + LM head (Kangaroo-style), saved as a small artifact beside the untouched base model.

Two kinds:
- ``mlp``: ``h + up(silu(down(rmsnorm(h))))`` with ``up`` zero-initialised, so a fresh adapter is the identity and
  the exits start exactly where the base model's are. Position-wise: it sees one position at a time.
- ``decoder_layer``: one or more standard decoder layers of the model's own class (attention with its own KV
  cache, gated MLP, norms), so the adapter attends over the exit's own past (Kangaroo's adapter). Initialised from
  the model's next layers (``next_layers``) or from them with the attention and MLP output projections zeroed
  (``zero_residual``: the identity at start). Because they are standard layers, exit + adapter is a plain
  checkpoint: ``models.draft_export`` writes layers 1..l, the adapter's layers, the final norm and the head as a
  ``LlamaForCausalLM`` that transformers and vLLM run as a draft model.

The base model's weights never change, so its final layer is the base model's bit for bit and its checkpoint loads
in plain transformers; ``attach_exit_adapters`` (in ``models.exits``) hooks the adapters into every exit path
without registering them in the model's state_dict.

Artifact layout (``exit_adapters/`` inside or beside a model directory)::

    adapters.safetensors   tensors named  l<layer>.<param>
    adapters.json          {"format", "kind", "layers", "hidden_size", "rank" | "adapter_layers", "fingerprint"}

The fingerprint hashes the base model's config, a bf16 image of its embeddings and final norm, and the tokenizer's
vocabulary; loading adapters onto another model or tokenizer is a clear error.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from layerexit.errors import ConfigError
from layerexit.tensor_dir import write_tensor_dir

ADAPTERS_DIR = "exit_adapters"
WEIGHTS_FILE = "adapters.safetensors"
META_FILE = "adapters.json"
FORMAT = "layerexit-exit-adapters/1"
ADAPTER_KINDS = ("mlp", "decoder_layer")
DECODER_INITS = ("next_layers", "zero_residual")


class RMSNorm(nn.Module):
    """LLaMA's RMSNorm (kept here so the adapter has no dependency on a transformers class)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Shape: (..., H) -> (..., H)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x32).to(dtype)


class ExitAdapter(nn.Module):
    """``h + up(silu(down(norm(h))))``: a residual low-rank SiLU MLP; zero-initialised output = identity at start."""

    kind = "mlp"
    attends = False  # position-wise: no KV cache, any (..., H) input

    def __init__(self, hidden_size: int, rank: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.hidden_size, self.rank = hidden_size, rank
        self.norm = RMSNorm(hidden_size, eps)
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, hidden_size, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # Shape: (..., H) -> (..., H)
        return hidden + self.up(nn.functional.silu(self.down(self.norm(hidden))))

    def flops(self, positions: int) -> int:
        """Multiply-adds x 2 of the two matmuls for ``positions`` positions (norm and SiLU are elementwise)."""
        return 2 * positions * (self.hidden_size * self.rank + self.rank * self.hidden_size)


class DecoderLayerAdapter(nn.Module):
    """Standard decoder layers (the model's own class) between an exit's hidden state and the final norm + head.

    ``forward`` runs them over whole sequences (B, T, H) with a causal mask and the model's rotary embedding (what
    training, traces and alignment use); ``step`` runs them inside the engine with the engine's mask, positions,
    rotary embedding and KV cache. The layers' attention ``layer_idx`` is where their K/V live in a cache: the
    engine puts them after the model's own layers (``set_cache_base``)."""

    kind = "decoder_layer"
    attends = True

    def __init__(self, model: nn.Module, exit_layer: int, num_layers: int, init: str = "zero_residual") -> None:
        super().__init__()
        from layerexit.models.exits import decoder_parts

        if init not in DECODER_INITS:
            raise ConfigError(f"adapters.init {init!r} is not one of {DECODER_INITS}", f"use one of {DECODER_INITS}")
        parts = decoder_parts(model)
        L = parts.num_layers
        if not 1 <= exit_layer < L:
            raise ConfigError(f"adapters: exit layer {exit_layer} has no next layer to build an adapter from",
                              f"use exit layers 1..{L - 1}")
        if not 1 <= num_layers <= L - exit_layer:
            raise ConfigError(f"adapters.num_layers {num_layers} does not fit after exit layer {exit_layer} "
                              f"(the model has {L} layers)", f"use 1..{L - exit_layer} adapter layers")
        self.hidden_size = model.config.hidden_size
        self.exit_layer, self.init = int(exit_layer), init
        # Built with the index of the layer they copy (valid for per-layer config such as Qwen2's layer_types).
        self.layers = nn.ModuleList()
        for j in range(num_layers):
            src = parts.layers[exit_layer + j]
            layer = type(src)(model.config, exit_layer + j)
            layer.load_state_dict(src.state_dict())
            if init == "zero_residual":
                nn.init.zeros_(layer.self_attn.o_proj.weight)
                nn.init.zeros_(layer.mlp.down_proj.weight)
            self.layers.append(layer)
        ref = parts.norm.weight
        self.to(device=ref.device, dtype=ref.dtype)
        self.set_cache_base(L)  # after the model's own layers; the engine sets it again for the draft it runs
        object.__setattr__(self, "_config", model.config)
        object.__setattr__(self, "_rotary", parts.rotary)
        self._params_per_position = sum(p.numel() for n, p in self.named_parameters() if p.dim() == 2)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def set_cache_base(self, base: int) -> None:
        """Keep this adapter's K/V at cache layers base, base+1, ... (0-based)."""
        for j, layer in enumerate(self.layers):
            layer.self_attn.layer_idx = base + j

    def step(self, hidden: torch.Tensor, mask, position_ids: torch.Tensor, rope, cache) -> torch.Tensor:
        """The adapter's layers on (B, n, H) with the caller's mask / positions / rotary embedding / cache."""
        for layer in self.layers:
            out = layer(hidden, attention_mask=mask, position_ids=position_ids, cache=cache,
                        use_cache=cache is not None, position_embeddings=rope)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        # Shape: (B, T, H) -> (B, T, H); every position attends to itself and the positions before it
        if hidden.dim() != 3:
            raise ValueError("a decoder-layer adapter attends over a sequence: pass hidden states (B, T, H)")
        from transformers.masking_utils import create_causal_mask

        from layerexit.models.exits import default_position_ids

        if position_ids is None:
            position_ids = default_position_ids(attention_mask, hidden[..., 0].long())
        mask = create_causal_mask(config=self._config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  cache=None, position_ids=position_ids)
        rope = self._rotary(hidden, position_ids=position_ids) if self._rotary is not None else None
        return self.step(hidden, mask, position_ids, rope, None)

    def flops(self, positions: int) -> int:
        """Matrix-product FLOPs of the adapter's layers for ``positions`` positions (attention scores, which
        depend on the context length, are priced by the engine's layer price instead)."""
        return 2 * positions * self._params_per_position


def build_adapters(layers, hidden_size: int, rank: int, eps: float = 1e-6) -> dict[int, ExitAdapter]:
    """One fresh (identity) MLP adapter per exit layer."""
    return {int(l): ExitAdapter(hidden_size, rank, eps) for l in sorted(set(layers))}


def build_decoder_adapters(model: nn.Module, layers, num_layers: int, init: str = "zero_residual"
                           ) -> dict[int, DecoderLayerAdapter]:
    """One decoder-layer adapter per exit layer, ``num_layers`` layers each, copied from the model's next layers."""
    return {int(l): DecoderLayerAdapter(model, int(l), num_layers, init) for l in sorted(set(layers))}


def num_parameters(adapters: Mapping[int, nn.Module]) -> int:
    return sum(p.numel() for a in adapters.values() for p in a.parameters())


# ----------------------------------------------------------------------------------------------- fingerprint


def base_fingerprint(model: nn.Module, tokenizer) -> dict[str, str]:
    """Identify a base model + tokenizer: config, a bf16 image of the embeddings and final norm, the vocabulary.

    The bf16 image makes the same checkpoint loaded in fp32 or bf16 fingerprint the same.
    """
    from layerexit.models.exits import decoder_parts

    parts = decoder_parts(model)
    cfg = model.config.to_dict()
    keep = {k: cfg.get(k) for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size",
                                    "intermediate_size", "num_attention_heads", "num_key_value_heads")}
    h = hashlib.sha256(json.dumps(keep, sort_keys=True).encode())
    with torch.no_grad():
        for t in (parts.embed.weight, parts.norm.weight):
            h.update(t.detach().to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    vocab = sorted(tokenizer.get_vocab().items()) if tokenizer is not None else []
    tok = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()
    return {"model": h.hexdigest()[:32], "tokenizer": tok[:32]}


def check_fingerprint(found: Mapping[str, str], expected: Mapping[str, str], what: str, field: str) -> None:
    """A clear error when an artifact was built for another model or tokenizer."""
    for key in ("model", "tokenizer"):
        if found.get(key) != expected.get(key):
            raise ConfigError(
                f"{field}: {what} was built for another {key} (fingerprint {found.get(key)} != {expected.get(key)})",
                f"rebuild it for this {key} or point {field} at the matching one",
            )


# ----------------------------------------------------------------------------------------------- save / load


def adapter_kind(adapters: Mapping[int, nn.Module]) -> str:
    kinds = {getattr(a, "kind", "mlp") for a in adapters.values()}
    if len(kinds) != 1:
        raise ValueError(f"adapters of mixed kinds {sorted(kinds)}")
    return kinds.pop()


def save_adapters(adapters: Mapping[int, nn.Module], directory: str | Path, fingerprint: Mapping[str, str]) -> Path:
    """Write ``directory`` (weights + json) atomically: a temp directory renamed into place."""
    tensors = {f"l{l}.{k}": v.detach().float().cpu()
               for l, a in adapters.items() for k, v in a.state_dict().items()}
    first = next(iter(adapters.values()))
    kind = adapter_kind(adapters)
    meta = {"format": FORMAT, "kind": kind, "layers": sorted(int(l) for l in adapters),
            "hidden_size": first.hidden_size, "parameters": num_parameters(adapters), "fingerprint": dict(fingerprint)}
    if kind == "mlp":
        meta.update(rank=first.rank, eps=first.norm.eps)
    else:
        meta.update(adapter_layers=first.num_layers, init=first.init)
    return write_tensor_dir(directory, tensors, meta, WEIGHTS_FILE, META_FILE)


def read_adapter_meta(directory: str | Path) -> dict:
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise ConfigError(f"{directory} is not a complete exit-adapter directory (needs {META_FILE} and {WEIGHTS_FILE})",
                          "point at the exit_adapters/ directory a training run wrote")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{directory}: unknown adapter format {meta.get('format')!r}", f"expected {FORMAT}")
    return meta


def load_adapters(directory: str | Path, model: nn.Module | None = None, tokenizer=None,
                  field: str = "adapters") -> dict[int, nn.Module]:
    """Load adapters; with ``model`` (and ``tokenizer``) the fingerprint and layers are checked against it and the
    adapters are moved to its device and dtype. Decoder-layer adapters need ``model`` (they are its layer class)."""
    from safetensors.torch import load_file

    meta = read_adapter_meta(directory)
    kind = meta.get("kind", "mlp")
    if kind not in ADAPTER_KINDS:
        raise ConfigError(f"{directory}: unknown adapter kind {kind!r}", f"expected one of {ADAPTER_KINDS}")
    if model is not None:
        from layerexit.models.exits import decoder_parts

        parts = decoder_parts(model)
        check_fingerprint(meta["fingerprint"], base_fingerprint(model, tokenizer), f"adapters in {directory}", field)
        bad = [l for l in meta["layers"] if not 1 <= l < parts.num_layers]
        if bad:
            raise ConfigError(f"{field}: adapters for layers {bad} but the model has exits 1..{parts.num_layers - 1}")
    if kind == "mlp":
        adapters = build_adapters(meta["layers"], meta["hidden_size"], meta["rank"], meta.get("eps", 1e-6))
    elif model is None:
        raise ConfigError(f"{directory}: decoder-layer adapters are built from the model's own layer class",
                          "load them with the base model (load_adapters(directory, model, tokenizer))")
    else:
        adapters = build_decoder_adapters(model, meta["layers"], meta["adapter_layers"], meta.get("init", "zero_residual"))
    tensors = load_file(str(Path(directory) / WEIGHTS_FILE))
    for l, a in adapters.items():
        a.load_state_dict({k: tensors[f"l{l}.{k}"] for k in a.state_dict()})
    if model is not None:
        ref = parts.norm.weight
        for a in adapters.values():
            a.to(device=ref.device, dtype=ref.dtype).eval()
            for p in a.parameters():
                p.requires_grad_(False)
    return adapters


def find_adapters_dir(model_dir: str | Path) -> Path | None:
    """The ``exit_adapters/`` directory shipped inside a model directory, if any."""
    candidate = Path(model_dir) / ADAPTERS_DIR
    return candidate if (candidate / META_FILE).is_file() else None


def adapter_flops(adapters: Mapping[int, nn.Module], layer: int, positions: int) -> int:
    """FLOPs of the adapter at ``layer`` for ``positions`` positions (0 when the exit has none)."""
    a = adapters.get(layer)
    return int(a.flops(positions)) if a is not None and hasattr(a, "flops") else 0
