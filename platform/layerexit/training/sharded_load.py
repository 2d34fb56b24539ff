"""Build the model (and the frozen teacher) for a training rank, sharded from the start under ZeRO-3.

Without ZeRO-3 each rank loads a full copy (``from_pretrained``) and DeepSpeed partitions what its stage
partitions. Under ZeRO-3 that full copy per rank is what keeps 13B-70B models from starting (26 GB of host memory
per rank for 13B in bf16), so construction goes through transformers' DeepSpeed integration instead: with a live
``HfDeepSpeedConfig`` holding the job's DeepSpeed config, ``from_pretrained`` builds every module inside
``deepspeed.zero.Init`` (each parameter is partitioned as soon as its module is built, on the rank's device) and
rank 0 alone reads the checkpoint, copying it in one module at a time while the others hold only their shard. The
config object is dropped right after loading: while it lives transformers treats the process as ZeRO-3 (its
``generate`` then waits for every rank), which the rank-0 inference copy used for alignment must not.

The frozen teacher of the anchor loss is built the same way and wrapped in a DeepSpeed engine of its own without
an optimizer (the pattern TRL uses for reference models), so its shards are gathered per module on forward;
below ZeRO-3 it is a plain full copy, as before.
"""

from __future__ import annotations

import copy
import gc
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from layerexit.training.rank_memory import PeakRss, rank_param_bytes


@dataclass
class LoadReport:
    """What loading cost this rank (measured)."""

    sharded: bool
    param_bytes: int  # parameter bytes held on this rank after loading
    load_peak_delta_bytes: int  # growth of anonymous RSS at its peak while loading (PeakRss)
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def as_metrics(self, prefix: str = "memory/") -> dict[str, float]:
        mib = 2**20
        return {f"{prefix}params_mib": self.param_bytes / mib,
                f"{prefix}load_peak_mib": self.load_peak_delta_bytes / mib, f"{prefix}load_s": self.seconds}


def _load(spec: str, dtype: torch.dtype):
    from layerexit.models.loading import load_model_and_tokenizer

    return load_model_and_tokenizer(spec, dtype=dtype)


def _import_model_code(spec: str, sharded: bool) -> None:
    """Import the model's classes (and zero.Init) before measuring, so the load figure is the model's memory, not
    the ~100 MiB of code and tables a first import brings."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from layerexit.models.loading import resolve_model

    try:
        config = AutoConfig.from_pretrained(resolve_model(spec).location)
        AutoModelForCausalLM._model_mapping[type(config)]  # noqa: B018 - the lookup imports the modeling module
    except Exception:  # noqa: BLE001 - loading itself reports a bad spec with its own message
        return
    if sharded:
        import deepspeed.runtime.zero.partition_parameters  # noqa: F401


def load_for_training(spec: str, dtype: torch.dtype, ds_config: dict[str, Any] | None) -> tuple[nn.Module, Any, LoadReport]:
    """The model and tokenizer for one rank. ``ds_config`` with ZeRO stage 3 (and torch.distributed initialised):
    sharded construction; otherwise a full copy. Returns the measured ``LoadReport`` too."""
    import time

    sharded = bool(ds_config) and int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3
    _import_model_code(spec, sharded)
    start = time.perf_counter()
    with PeakRss() as peak:
        if sharded:
            from transformers.integrations import HfDeepSpeedConfig

            hf_ds = HfDeepSpeedConfig(copy.deepcopy(ds_config))  # noqa: F841 - must stay alive while loading
            try:
                model, tokenizer = _load(spec, dtype)
            finally:
                del hf_ds
                gc.collect()
        else:
            model, tokenizer = _load(spec, dtype)
    report = LoadReport(sharded, rank_param_bytes(model), peak.peak_delta_bytes, time.perf_counter() - start)
    return model, tokenizer, report


def teacher_ds_config(ds_config: dict[str, Any]) -> dict[str, Any]:
    """DeepSpeed config for the frozen teacher's engine: the job's ZeRO-3 and precision, no optimizer."""
    cfg = {"train_micro_batch_size_per_gpu": ds_config.get("train_micro_batch_size_per_gpu", 1),
           "train_batch_size": ds_config.get("train_batch_size"),
           "gradient_accumulation_steps": ds_config.get("gradient_accumulation_steps", 1),
           "zero_optimization": {"stage": 3, **{k: v for k, v in ds_config.get("zero_optimization", {}).items()
                                                if k.startswith(("stage3_param", "stage3_prefetch",
                                                                 "stage3_max_live", "offload_param"))}},
           "steps_per_print": 10**9}
    if ds_config.get("bf16", {}).get("enabled"):
        cfg["bf16"] = {"enabled": True}
    return {k: v for k, v in cfg.items() if v is not None}


def load_teacher(spec: str, dtype: torch.dtype, ds_config: dict[str, Any] | None, device) -> tuple[nn.Module, LoadReport]:
    """The frozen starting model for the anchor loss: under ZeRO-3 sharded and served by its own optimizer-free
    DeepSpeed engine (returns ``engine.module``, whose forward hooks gather each module's shards); otherwise a full
    copy on ``device``."""
    model, _, report = load_for_training(spec, dtype, ds_config)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if not report.sharded:
        return model.to(device), report
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, config=teacher_ds_config(ds_config))
    engine.eval()
    return engine.module, report
