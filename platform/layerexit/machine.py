"""What machine a figure was measured on, and which dtype suits which work on it.

Figures differ 2-4x between the CPUs this project runs on (an AVX-512/AMX Xeon, an AVX2-only EPYC), so every
benchmark row carries ``describe_machine()``: CPU model, the ISA flags that decide bf16 speed, torch's CPU
capability and the thread count.

``choose_dtype(stage)`` resolves ``dtype: auto`` for one stage of work:

- GPU: bfloat16.
- CPU with native bf16 (``avx512_bf16`` or AMX): bfloat16 everywhere (training as bf16 autocast).
- CPU without it: float32 for compute-bound work (``train``, ``prefill``, ``batched`` decoding and serving),
  where a bf16 matmul ran ~30x slower than fp32 (512x576 @ 576x1536: 1.0 vs 29 GFLOP/s on an AVX2 EPYC), and
  bfloat16 for batch-1 ``decode``, which is memory-bound (matrix-vector products): half the bytes per token still
  wins there (transformers ``generate`` 12.3 vs 9.8 tokens/s on the same EPYC).

Every choice is logged (``logger.info``); callers that have an MLflow run record ``DtypeChoice.as_tags()``.
Tests patch ``detect_cpu`` to play a CPU without native bf16.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

# The flags that decide how fast fp32 / bf16 matmuls are on x86 (in /proc/cpuinfo's spelling).
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")

Stage = Literal["train", "prefill", "batched", "decode"]
STAGES: tuple[str, ...] = ("train", "prefill", "batched", "decode")
COMPUTE_BOUND = frozenset({"train", "prefill", "batched"})
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class CpuInfo:
    """The CPU as far as dtype choices and benchmark figures care."""

    model: str
    flags: frozenset[str] = field(default_factory=frozenset)  # every flag the OS reports
    capability: str = ""  # torch.backends.cpu.get_cpu_capability(): DEFAULT, AVX2, AVX512...

    @property
    def isa(self) -> list[str]:
        """Those of ``ISA_FLAGS`` this CPU has, in ``ISA_FLAGS`` order."""
        return [f for f in ISA_FLAGS if f in self.flags]

    @property
    def native_bf16(self) -> bool:
        """bf16 dot products in hardware (AVX-512 BF16 or AMX): bf16 matmuls are fast, not emulated."""
        return any(f in self.flags for f in NATIVE_BF16_FLAGS)


def _cpuinfo_fields(text: str) -> tuple[str, frozenset[str]]:
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:  # x86 / arm64 spelling
            flags = frozenset(value.split())
        if model and flags:
            break
    return model, flags


@functools.lru_cache(maxsize=1)
def detect_cpu() -> CpuInfo:
    """This machine's CPU (read once per process): /proc/cpuinfo on Linux, ``platform`` elsewhere."""
    model, flags = "", frozenset()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        try:
            model, flags = _cpuinfo_fields(cpuinfo.read_text(errors="replace"))
        except OSError:
            pass
    try:
        import torch

        capability = str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001 - describing the machine must never fail a run
        capability = "unknown"
    return CpuInfo(model or platform.processor() or platform.machine() or "unknown", flags, capability)


def describe_machine() -> dict:
    """What every benchmark figure is recorded with: CPU model, ISA flags, torch capability, threads, GPU."""
    import torch

    cpu = detect_cpu()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "cpu": cpu.model,
        "isa": cpu.isa,
        "native_bf16": cpu.native_bf16,
        "cpu_capability": cpu.capability,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "gpu": gpu,
    }


def machine_line(desc: dict | None = None) -> str:
    """``describe_machine()`` as one line for logs and Markdown tables."""
    d = desc or describe_machine()
    gpu = f", GPU {d['gpu']}" if d.get("gpu") else ""
    return (f"{d['cpu']} ({', '.join(d['isa']) or 'no AVX2'}; torch {d['cpu_capability']}), "
            f"{d['threads']} threads{gpu}")


@dataclass(frozen=True)
class DtypeChoice:
    """A resolved dtype for one stage, and why."""

    stage: str
    dtype: str  # float32 | bfloat16 | float16
    requested: str
    reason: str

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def as_tags(self) -> dict[str, str]:
        """MLflow tags (or params) recording the choice."""
        return {f"layerexit.dtype.{self.stage}": self.dtype, f"layerexit.dtype.{self.stage}.reason": self.reason}


def choose_dtype(stage: str, requested: str = "auto", device: str = "cpu", *, log: bool = True,
                 what: str | None = None) -> DtypeChoice:
    """Resolve ``requested`` (``auto`` or an explicit dtype name, kept as is) for ``stage``: one of ``STAGES``.

    ``device``: ``cpu``, ``cuda``, ``cuda:1``... (``auto`` means cuda when available). ``what`` names the caller in
    the log line (e.g. "serving", "teacher cache").
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; use one of {', '.join(STAGES)}")
    if requested != "auto" and requested not in DTYPES:
        raise ValueError(f"unknown dtype {requested!r}; use auto or one of {', '.join(DTYPES)}")
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if requested != "auto":
        choice = DtypeChoice(stage, requested, requested, "explicit")
    elif not device.startswith("cpu"):
        choice = DtypeChoice(stage, "bfloat16", requested, f"device {device}")
    else:
        cpu = detect_cpu()
        flags = ", ".join(cpu.isa) or "no AVX2"
        if cpu.native_bf16:
            choice = DtypeChoice(stage, "bfloat16", requested, f"CPU has native bf16 ({flags})")
        elif stage in COMPUTE_BOUND:
            choice = DtypeChoice(stage, "float32", requested, f"CPU without native bf16 ({flags}): {stage} is "
                                 "compute-bound, where bf16 matmuls are emulated (~30x slower than fp32)")
        else:
            choice = DtypeChoice(stage, "bfloat16", requested, f"CPU without native bf16 ({flags}): batch-1 "
                                 "decoding is memory-bound, bf16 halves the bytes read per token")
    if log and requested == "auto":
        logger.info("dtype auto -> %s for %s%s: %s", choice.dtype, stage, f" ({what})" if what else "", choice.reason)
    return choice


def training_precision(requested: str = "auto", use_gpu: bool = False, *, log: bool = True) -> str:
    """Resolve a training ``precision`` (auto | fp32 | bf16 | autocast_bf16): on a GPU bf16 weights; on a CPU
    with native bf16, fp32 weights with bf16 autocast compute; on other CPUs fp32."""
    if requested != "auto":
        return requested
    choice = choose_dtype("train", "auto", "cuda" if use_gpu else "cpu", log=log, what="training precision")
    if choice.dtype == "float32":
        return "fp32"
    return "bf16" if use_gpu else "autocast_bf16"
