"""Memory of a training rank: host memory measured on the worker, host and GPU memory planned on the driver.

Measured (worker): ``PeakRss`` samples the process's anonymous resident memory (``RssAnon``: heap and tensors,
not file pages such as a memory-mapped safetensors file) in a thread while the model loads, and
``rank_param_bytes`` sums the parameter bytes this rank holds (under ZeRO-3 its partition, ``ds_tensor``; otherwise
the whole tensor). The job logs both per rank (``memory/*`` metrics), so MLflow shows what sharding saved.

Planned (driver, before any worker starts): ``check_training_memory`` prices what each rank must hold on the path
the config chooses: in host memory (a full copy per rank without ZeRO-3, a 1/world share with it; the frozen teacher
likewise; on CPU also gradients and optimizer state) against the memory Ray reports for the nodes, and on GPU
(weights, gradients, fp32 master weights and Adam moments as the ZeRO stage shards them, plus the teacher) against
the memory of the accelerator type Ray reports. A run that cannot fit stops with an error naming the field and the
fix, instead of workers dying one by one in the OOM killer or CUDA's allocator.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from layerexit.errors import ConfigError

_MIB = 2**20


def rss_anon_bytes() -> int:
    """This process's anonymous resident memory (``RssAnon`` in /proc/self/status; VmRSS where that is missing)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value
    raw = fields.get("RssAnon") or fields.get("VmRSS") or "0 kB"
    return int(raw.split()[0]) * 1024


class PeakRss:
    """Context manager: the peak of ``rss_anon_bytes`` over the block, sampled every ``interval_s`` in a thread,
    and its growth over the value at entry (``peak_delta_bytes``)."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.start_bytes = self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, rss_anon_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRss:
        self.start_bytes = self.peak_bytes = rss_anon_bytes()
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_bytes = max(self.peak_bytes, rss_anon_bytes())

    @property
    def peak_delta_bytes(self) -> int:
        return self.peak_bytes - self.start_bytes


def rank_param_bytes(module: nn.Module) -> int:
    """Bytes of parameter data this rank holds: a ZeRO-3 partitioned parameter counts its partition only."""
    total, seen = 0, set()
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        held = getattr(p, "ds_tensor", None)
        t = held if held is not None else p.data
        total += t.numel() * t.element_size()
    return total


# ----------------------------------------------------------------------------------------------- driver-side plan


def model_param_count(location: str | Path) -> int:
    """Parameters of the model at ``location`` (a directory or cached hub id), counted on the meta device from its
    config alone: no weights are read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(location)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@dataclass(frozen=True)
class HostMemoryPlan:
    """What one rank holds in host memory on the chosen path (bytes), and why."""

    params: int
    weight_bytes: int  # the model's weights on this rank at load time
    teacher_bytes: int  # the frozen teacher's (0 without one)
    state_bytes: int  # gradients + fp32 master + Adam moments held in host memory (CPU training)
    sharded: bool

    @property
    def per_rank_bytes(self) -> int:
        return self.weight_bytes + self.teacher_bytes + self.state_bytes

    def as_metrics(self) -> dict[str, float]:
        return {"memory/plan_rank_host_mib": self.per_rank_bytes / _MIB, "memory/plan_params": float(self.params)}


def plan_host_memory(params: int, *, world: int, zero_stage: int, precision: str, use_gpu: bool,
                     teacher: bool, offload_optimizer: bool = False, trains_base: bool = True) -> HostMemoryPlan:
    """Host bytes one rank needs. Weights: 2 bytes per parameter in bf16, 4 otherwise; a full copy per rank unless
    ZeRO-3 shards construction (then 1/world, plus one layer gathered at a time, which is small beside it). On
    GPU the weights pass through host memory while loading (the unsharded path) and the optimizer state lives on
    the GPU unless offloaded; on CPU everything stays: gradients (full below ZeRO-2) and 12 bytes per parameter of
    fp32 master weights and Adam moments, sharded from ZeRO-1 on (none for a frozen base: ``trains_base``)."""
    weight = params * (2 if precision == "bf16" else 4)
    sharded = zero_stage == 3
    per_rank_weight = -(-weight // world) if sharded else weight
    teacher_bytes = per_rank_weight if teacher else 0
    if sharded and use_gpu:
        per_rank_weight = teacher_bytes = 0  # zero.Init builds each shard on the GPU; rank 0 maps the file
    state = 0
    if trains_base and (not use_gpu or offload_optimizer):
        master = 12 * params if precision == "bf16" else 8 * params  # fp32 weights are the master copy in fp32
        state = master // world if zero_stage >= 1 else master
        if not use_gpu:
            grads = params * (2 if precision == "bf16" else 4)
            state += grads // world if zero_stage >= 2 else grads
    return HostMemoryPlan(params, per_rank_weight, teacher_bytes, state, sharded)


def node_memory_bytes(nodes: list[dict[str, Any]]) -> int | None:
    """The smallest ``memory`` resource (bytes Ray lets tasks use) among alive nodes, or None if none reports one."""
    values = [n.get("Resources", {}).get("memory") for n in nodes if n.get("Alive", n.get("alive", True))]
    values = [v for v in values if v]
    return int(min(values)) if values else None


def check_host_memory(plan: HostMemoryPlan, *, ranks_per_node: int, available_bytes: int | None,
                      zero_stage: int, teacher: bool) -> None:
    """Raise a ConfigError, naming the field and the fix, when ``ranks_per_node`` ranks of ``plan`` do not fit in
    ``available_bytes`` of one node (None: unknown, no check)."""
    if available_bytes is None:
        return
    need = plan.per_rank_bytes * ranks_per_node
    if need <= available_bytes:
        return
    gib = 2**30
    detail = (f"{ranks_per_node} rank(s) per node x {plan.per_rank_bytes / gib:.1f} GiB (weights "
              f"{plan.weight_bytes / gib:.1f}" + (f", teacher {plan.teacher_bytes / gib:.1f}" if teacher else "")
              + (f", gradients/optimizer {plan.state_bytes / gib:.1f}" if plan.state_bytes else "")
              + f") = {need / gib:.1f} GiB, but a node offers {available_bytes / gib:.1f} GiB to Ray tasks")
    if zero_stage != 3:
        fix = ("set deepspeed.zero_stage: 3, which builds the model sharded (each rank holds 1/world of it, the "
               "teacher too), or lower scaling.num_workers per node")
        field = "deepspeed.zero_stage"
    else:
        fix = "use more nodes (scaling.num_workers spread over more machines) or nodes with more memory"
        field = "scaling.num_workers"
    if teacher:
        fix += "; lite.anchor_weight: 0 drops the frozen teacher copy"
    raise ConfigError(f"{field}: the model does not fit in host memory on this path: {detail}", fix)


def check_training_memory(cfg, nodes: list[dict[str, Any]], console=None) -> HostMemoryPlan | None:
    """``plan_host_memory`` for a training config on the alive ``nodes`` (``ray.nodes()``), checked; None when the
    model's size cannot be read from its config (the loaders report that error themselves)."""
    from layerexit.models.loading import resolve_model

    try:
        params = model_param_count(resolve_model(cfg.model.spec).location)
    except Exception:  # noqa: BLE001 - an unreadable config is reported by the loaders with its own message
        return None
    world = cfg.scaling.num_workers
    teacher = cfg.recipe == "lite" and cfg.lite.anchor_weight > 0
    plan = plan_host_memory(params, world=world, zero_stage=cfg.deepspeed.zero_stage, precision=cfg.precision,
                            use_gpu=cfg.scaling.use_gpu, teacher=teacher,
                            offload_optimizer=cfg.deepspeed.offload_optimizer, trains_base=cfg.recipe not in ("adapters", "eagle3"))
    alive = [n for n in nodes if n.get("Alive", n.get("alive", True))]
    ranks_per_node = -(-world // max(1, len(alive)))  # the most even spread Ray can make
    check_host_memory(plan, ranks_per_node=ranks_per_node, available_bytes=node_memory_bytes(alive),
                      zero_stage=cfg.deepspeed.zero_stage, teacher=teacher)
    if cfg.scaling.use_gpu:
        gpu_plan = plan_gpu_memory(params, world=world, zero_stage=cfg.deepspeed.zero_stage,
                                   offload_optimizer=cfg.deepspeed.offload_optimizer, teacher=teacher,
                                   trains_base=cfg.recipe not in ("adapters", "eagle3"))
        check_gpu_memory(gpu_plan, gpu_memory_bytes(alive), zero_stage=cfg.deepspeed.zero_stage, teacher=teacher,
                         offload_optimizer=cfg.deepspeed.offload_optimizer)
    if console is not None:
        console.print(f"host memory per rank: {plan.per_rank_bytes / 2**30:.2f} GiB planned "
                      f"({'ZeRO-3 sharded construction' if plan.sharded else 'a full copy per rank'}, "
                      f"{params / 1e9:.2f}B parameters)")
    return plan


# Memory of the accelerators Ray labels nodes with (``accelerator_type:<name>`` resources), GiB. Types whose
# memory varies by model (A100 40/80 GB) are left out: unknown means no GPU check.
GPU_MEMORY_GIB = {"H200": 141, "H100": 80, "GH200": 96, "B200": 180, "L40S": 48, "L40": 48, "L4": 24, "A10G": 24,
                  "A10": 24, "V100": 16, "T4": 16}
ACTIVATION_HEADROOM = 0.15  # share of a GPU kept for activations, head chunks, NCCL and allocator slack


def gpu_memory_bytes(nodes: list[dict[str, Any]]) -> tuple[str, int] | None:
    """(accelerator type, bytes per GPU) of the alive nodes' GPUs when Ray labels them with a known type; the
    smallest if types differ; None when unknown."""
    found = []
    for n in nodes:
        if not n.get("Alive", n.get("alive", True)):
            continue
        for key in n.get("Resources", {}):
            if key.startswith("accelerator_type:"):
                name = key.split(":", 1)[1]
                if name in GPU_MEMORY_GIB:
                    found.append((name, GPU_MEMORY_GIB[name] * 10**9))
    return min(found, key=lambda t: t[1]) if found else None


@dataclass(frozen=True)
class GpuMemoryPlan:
    """Bytes one GPU holds for the model's training state and the teacher (activations not included)."""

    weights: int
    grads: int
    optimizer: int
    teacher: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.teacher


def plan_gpu_memory(params: int, *, world: int, zero_stage: int, offload_optimizer: bool, teacher: bool,
                    trains_base: bool = True) -> GpuMemoryPlan:
    """bf16 training on GPU: 2-byte weights (sharded under ZeRO-3), 2-byte gradients (sharded from ZeRO-2), 12 bytes
    of fp32 master weights and Adam moments (sharded from ZeRO-1, none on the GPU when offloaded), and the frozen
    teacher's 2-byte weights (sharded under ZeRO-3)."""
    shard = lambda b, on: -(-b // world) if on else b  # noqa: E731
    weights = shard(2 * params, zero_stage == 3)
    if not trains_base:
        return GpuMemoryPlan(weights, 0, 0, weights if teacher else 0)
    grads = shard(2 * params, zero_stage >= 2)
    optimizer = 0 if offload_optimizer else shard(12 * params, zero_stage >= 1)
    return GpuMemoryPlan(weights, grads, optimizer, weights if teacher else 0)


def check_gpu_memory(plan: GpuMemoryPlan, gpu: tuple[str, int] | None, *, zero_stage: int, teacher: bool,
                     offload_optimizer: bool) -> None:
    """Raise a ConfigError when ``plan`` leaves less than ``ACTIVATION_HEADROOM`` of a ``gpu`` (None: no check)."""
    if gpu is None:
        return
    name, capacity = gpu
    usable = (1 - ACTIVATION_HEADROOM) * capacity
    if plan.total <= usable:
        return
    gib = 2**30
    detail = (f"weights {plan.weights / gib:.1f} + gradients {plan.grads / gib:.1f} + optimizer "
              f"{plan.optimizer / gib:.1f}" + (f" + teacher {plan.teacher / gib:.1f}" if teacher else "")
              + f" = {plan.total / gib:.1f} GiB per GPU, over {usable / gib:.1f} GiB usable of an {name} "
              f"({capacity / gib:.0f} GiB, {ACTIVATION_HEADROOM:.0%} kept for activations)")
    if teacher and plan.total - plan.teacher <= usable:
        field, fix = "lite.anchor_weight", ("the frozen teacher does not fit beside the model: set "
                                            "deepspeed.zero_stage: 3 (it is sharded like the model) or "
                                            "lite.anchor_weight: 0")
    elif zero_stage < 3:
        field, fix = "deepspeed.zero_stage", "set deepspeed.zero_stage: 3 (shards weights, gradients and optimizer)"
    elif not offload_optimizer:
        field, fix = "scaling.num_workers", ("use more GPUs (scaling.num_workers) or deepspeed.offload_optimizer: true "
                                             "(optimizer state in host memory)")
    else:
        field, fix = "scaling.num_workers", "use more GPUs (scaling.num_workers)"
    raise ConfigError(f"{field}: training state does not fit on the GPUs: {detail}", fix)
