"""The replica's KV-cache budget: what one token position costs, whether the configured budget fits the device,
and how many positions a request or a running batch reserves.

A row of an engine batch holds, per position, K and V for every layer plus (``kv: recompute``) the hidden state
where the position stopped. Batches are padded to their longest row, so a batch reserves
``rows x max(prompt + max_tokens)`` positions. The scheduler admits a request (new batch or join) only while the
sum over running batches stays within ``kv_budget_tokens``; the rest wait in the queue.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from layerexit.errors import ConfigError

GIB = 1 << 30


def kv_bytes_per_token(model_config, dtype: torch.dtype) -> int:
    """Bytes one token position costs in one row: K and V of every layer plus one hidden state."""
    cfg = model_config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    item = torch.empty((), dtype=dtype).element_size()
    return (2 * cfg.num_hidden_layers * kv_heads * head_dim + cfg.hidden_size) * item


def device_memory_bytes(device: str | torch.device) -> int:
    """Total memory of the device the cache lives on (GPU memory, or the host's RAM for ``cpu``)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:  # pragma: no cover - psutil comes with Ray
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def check_kv_budget(budget_tokens: int | None, bytes_per_token: int, weights_bytes: int, device_bytes: int) -> None:
    """Raise ConfigError naming ``kv_budget_tokens`` when the budget does not fit beside the weights."""
    if budget_tokens is None:
        return
    need = budget_tokens * bytes_per_token
    free = device_bytes - weights_bytes
    if need > free:
        fits = max(free, 0) // bytes_per_token
        raise ConfigError(
            f"kv_budget_tokens={budget_tokens} needs {need / GIB:.1f} GiB of KV cache ({bytes_per_token} bytes per "
            f"token position), but the device has {device_bytes / GIB:.1f} GiB and the weights take "
            f"{weights_bytes / GIB:.1f} GiB",
            f"set kv_budget_tokens to at most {fits} (leave headroom for activations), or use a larger device",
        )


def request_reservation(prompt_len: int, max_new_tokens: int) -> int:
    """Positions one row needs at most: its prompt and every token it may generate."""
    return int(prompt_len) + int(max_new_tokens)


def batch_reservation(row_reservations: Sequence[int]) -> int:
    """Positions a batch holds: every row padded to the longest (left padding, one width per batch)."""
    return len(row_reservations) * max(row_reservations, default=0)


def precheck_kv_budget(model_spec: str, device: str, dtype: str, budget_tokens: int | None) -> None:
    """The same check before any replica starts (``build_app``), where the driver can answer it: a local or
    embedded model served on this machine's kind of device. Weights are estimated from the checkpoint's files;
    the replica repeats the check exactly after loading. MLflow URIs, hub ids and GPUs the driver does not have
    are left to the replica."""
    if budget_tokens is None:
        return
    from transformers import AutoConfig

    from layerexit.errors import LayerexitError
    from layerexit.models.loading import resolve_model

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        return
    from layerexit.models.mlflow_source import is_mlflow_uri

    if is_mlflow_uri(model_spec):
        return  # resolving would download it: the replica checks
    try:
        resolved = resolve_model(model_spec, fetch=False)
    except LayerexitError:
        return  # not resolvable here without downloading: the replica checks
    if resolved.source not in ("embedded", "local", "gguf"):
        return
    from pathlib import Path

    location = Path(resolved.location)
    config = AutoConfig.from_pretrained(location)
    if dtype == "auto":
        from layerexit.machine import choose_dtype

        dtype = choose_dtype("batched", "auto", device, log=False).dtype
    weights = sum(p.stat().st_size for p in location.glob("*.safetensors")) or \
        sum(p.stat().st_size for p in location.glob("*.bin"))
    check_kv_budget(budget_tokens, kv_bytes_per_token(config, getattr(torch, dtype)), weights,
                    device_memory_bytes(device))
