"""Exit adapters for the frozen-base recipe: one small module per exit between the exit's hidden state and the
model's shared final norm + LM head (Kangaroo-style), saved as a small artifact beside the untouched base model.

An adapter is ``h + up(silu(down(rmsnorm(h))))`` with ``up`` zero-initialised, so a fresh adapter is the identity
and the exits start exactly where the base model's are. The base model's weights never change, so its final layer
is the base model's bit for bit and its checkpoint loads in plain transformers; ``attach_exit_adapters`` (in
``models.exits``) hooks the adapters into every exit path without registering them in the model's state_dict.

Artifact layout (``exit_adapters/`` inside or beside a model directory)::

    adapters.safetensors   tensors named  l<layer>.<param>
    adapters.json          {"format", "layers", "hidden_size", "rank", "fingerprint": {...}}

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


def build_adapters(layers, hidden_size: int, rank: int, eps: float = 1e-6) -> dict[int, ExitAdapter]:
    """One fresh (identity) adapter per exit layer."""
    return {int(l): ExitAdapter(hidden_size, rank, eps) for l in sorted(set(layers))}


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


def save_adapters(adapters: Mapping[int, ExitAdapter], directory: str | Path, fingerprint: Mapping[str, str]) -> Path:
    """Write ``directory`` (weights + json) atomically: a temp directory renamed into place."""
    tensors = {f"l{l}.{k}": v.detach().float().cpu()
               for l, a in adapters.items() for k, v in a.state_dict().items()}
    first = next(iter(adapters.values()))
    meta = {"format": FORMAT, "layers": sorted(int(l) for l in adapters), "hidden_size": first.hidden_size,
            "rank": first.rank, "eps": first.norm.eps, "parameters": num_parameters(adapters),
            "fingerprint": dict(fingerprint)}
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
                  field: str = "adapters") -> dict[int, ExitAdapter]:
    """Load adapters; with ``model`` (and ``tokenizer``) the fingerprint and layers are checked against it and the
    adapters are moved to its device and dtype."""
    from safetensors.torch import load_file

    meta = read_adapter_meta(directory)
    adapters = build_adapters(meta["layers"], meta["hidden_size"], meta["rank"], meta.get("eps", 1e-6))
    tensors = load_file(str(Path(directory) / WEIGHTS_FILE))
    for l, a in adapters.items():
        a.load_state_dict({k: tensors[f"l{l}.{k}"] for k in a.state_dict()})
    if model is not None:
        from layerexit.models.exits import decoder_parts

        parts = decoder_parts(model)
        check_fingerprint(meta["fingerprint"], base_fingerprint(model, tokenizer), f"adapters in {directory}", field)
        bad = [l for l in adapters if not 1 <= l < parts.num_layers]
        if bad:
            raise ConfigError(f"{field}: adapters for layers {bad} but the model has exits 1..{parts.num_layers - 1}")
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
