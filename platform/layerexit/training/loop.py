"""The LITE training loop. No Ray imports: the loop takes an engine, batches, settings and
callbacks, so it runs under Ray Train + DeepSpeed (``ray_trainer``), in a plain process (``TorchEngine``), or in a
benchmark.

An *engine* is anything with DeepSpeed's training surface: ``engine(**batch) -> {"loss", ...}``,
``engine.backward(loss)``, ``engine.is_gradient_accumulation_boundary()``, ``engine.step()``, ``engine.get_lr()``
and ``engine.module`` (a ``LiteObjective``). ``torch.distributed`` (when initialised) reduces metrics across ranks.

Its parts live beside it: the objective (``objective``), the data order (``data_order``), the distributed helpers
(``distributed``) and held-out evaluation (``evaluation``); this module re-exports them.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

# The loop's parts, one module each, re-exported: ``layerexit.training.loop`` stays the one import for callers.
from layerexit.training.objective import (  # noqa: F401
    FrozenTeacher,
    LiteObjective,
    _anchor_chunk,
    anchor_kl,
)
from layerexit.training.data_order import (  # noqa: F401
    epoch_batches,
    epoch_order,
    epoch_shards,
    eval_batches,
    pad_to_width,
    padding_share,
    rank_share,
    shared_widths,
    steps_per_epoch,
)
from layerexit.training.distributed import (  # noqa: F401
    all_reduce_mean,
    all_reduce_sum,
    world_info,
)
from layerexit.training.evaluation import (  # noqa: F401
    alignment_metrics,
    eval_loss_metrics,
    exit_losses,
    merge_alignment_reports,
    sharded_alignment,
)


# ----------------------------------------------------------------------------------------------- engine (no DeepSpeed)
def lr_lambda(total_steps: int, warmup_steps: int, schedule: str = "cosine",
              min_lr_ratio: float = 0.0) -> Callable[[int], float]:
    """Multiplier of the peak LR after ``step`` optimizer steps: linear warmup then cosine/linear/constant."""

    def fn(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        if schedule == "linear":
            decay = 1.0 - progress
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return min_lr_ratio + (1.0 - min_lr_ratio) * decay

    return fn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on norms, biases and other 1-D parameters."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        # A ZeRO-3 parameter built sharded (zero.Init) holds an empty placeholder; its real shape is ds_shape.
        ndim = len(getattr(p, "ds_shape", p.shape))
        (decay if ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class TorchEngine:
    """The DeepSpeed engine surface in plain PyTorch (single process or DDP-free tests and benchmarks)."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None, grad_accum: int = 1,
                 grad_clip: float = 0.0) -> None:
        self.module = module
        self.optimizer = optimizer
        self.lr_scheduler = scheduler
        self.grad_accum = grad_accum
        self.grad_clip = grad_clip
        self.micro_steps = 0
        self.global_steps = 0

    def __call__(self, **kwargs):
        return self.module(**kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.grad_accum == 0

    def step(self) -> None:
        if self.is_gradient_accumulation_boundary():
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
            self.optimizer.step()
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.global_steps += 1
        self.micro_steps += 1

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()


# ----------------------------------------------------------------------------------------------- the loop


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint (``trainer_state.json``)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    examples_in_epoch: int = 0  # examples of this epoch's global order consumed, all ranks (world-size free)
    tokens: float = 0.0  # non-padding tokens processed, all ranks
    world_size: int = 1  # ranks that wrote the checkpoint holding this state
    resumed_from_step: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping, examples_per_micro: int | None = None) -> TrainState:
        """Read a saved state. States written before ``examples_in_epoch`` existed hold ``micro_in_epoch`` (this
        rank's micro-batches); ``examples_per_micro`` (micro-batch size x the ranks that wrote it) converts them."""
        state = cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        if "examples_in_epoch" not in data and data.get("micro_in_epoch"):
            if examples_per_micro is None:
                raise ValueError("a saved state with micro_in_epoch needs examples_per_micro to convert it")
            state.examples_in_epoch = int(data["micro_in_epoch"]) * examples_per_micro
        return state


@dataclass
class LoopSettings:
    total_steps: int
    log_every: int = 1
    eval_every: int | None = None
    eval_at_start: bool = True
    checkpoint_every: int | None = None
    autocast: bool = False
    deadline: float | None = None  # time.time() after which the step that ends is the last (evaluated, checkpointed)


def deadline_passed(deadline: float | None) -> bool:
    """Whether any rank is past ``deadline`` (one all-reduce per optimizer step, so every rank stops at the same
    step); False without a deadline."""
    if deadline is None:
        return False
    return all_reduce_sum({"late": float(time.time() >= deadline)})["late"] > 0


@dataclass
class LoopCallbacks:
    """What the loop reports to. Each is called on every rank (they may contain collectives)."""

    on_log: Callable[[TrainState, dict[str, float]], None] = lambda state, metrics: None
    on_eval: Callable[[TrainState], dict[str, float]] = lambda state: {}
    on_checkpoint: Callable[[TrainState, dict[str, float]], None] = lambda state, metrics: None


@dataclass
class _Window:
    sums: dict[str, float] = field(default_factory=dict)
    micro: int = 0
    steps: int = 0
    tokens: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def add(self, out: Mapping, tokens: float) -> None:
        self.micro += 1
        self.tokens += tokens
        vals = {"train/loss": float(out["loss"].detach())}
        vals.update({f"train/loss_l{int(l):02d}": float(v) for l, v in out.get("per_layer", {}).items()})
        vals.update({f"train/distill_l{int(l):02d}": float(v) for l, v in out.get("distill", {}).items()})
        if "anchor" in out:
            vals["train/anchor_kl"] = float(out["anchor"])
        vals.update({f"train/{k}": float(v) for k, v in out.get("metrics", {}).items()})  # recipe-specific figures
        for k, v in vals.items():
            self.sums[k] = self.sums.get(k, 0.0) + v


def batch_rows(batch: Mapping[str, torch.Tensor]) -> int:
    """Examples (sequences, or cached positions) in a micro-batch."""
    return int(next(iter(batch.values())).shape[0])


def batch_tokens(batch: Mapping[str, torch.Tensor]) -> float:
    """Tokens a micro-batch trains on: non-padding tokens of sequences, or the rows of a batch of cached positions."""
    return float(batch["attention_mask"].sum()) if "attention_mask" in batch else float(batch["mask"].sum())


def train_loop(
    engine,
    batches_for_epoch: Callable[[int, int], Iterable[dict[str, torch.Tensor]]],
    settings: LoopSettings,
    state: TrainState | None = None,
    callbacks: LoopCallbacks | None = None,
    teacher: FrozenTeacher | None = None,
) -> TrainState:
    """Run optimizer steps until ``settings.total_steps``; log, evaluate and checkpoint through ``callbacks``.

    ``batches_for_epoch(epoch, skip)`` yields this rank's micro-batches of that epoch after its first ``skip``
    examples (a global count over all ranks, ``TrainState.examples_in_epoch``), so a resumed run continues mid-epoch
    where it stopped, on any number of ranks. Every rank's micro-batch holds the same number of examples, so one
    micro-step consumes that number times the world size. Returns the final state.
    """
    state = state or TrainState()
    _, world = world_info()
    state.world_size = world
    cb = callbacks or LoopCallbacks()
    last_metrics: dict[str, float] = {}
    if state.step == 0 and settings.eval_at_start:
        last_metrics.update(cb.on_eval(state))
    if state.step >= settings.total_steps:
        return state
    engine.train()
    window = _Window()
    kwargs = {"teacher": teacher} if teacher is not None else {}
    stopped = False
    while state.step < settings.total_steps and not stopped:
        produced = False
        for batch in batches_for_epoch(state.epoch, state.examples_in_epoch):
            produced = True
            device_type = next(iter(batch.values())).device.type
            ctx = torch.autocast(device_type, dtype=torch.bfloat16) if settings.autocast else contextlib.nullcontext()
            with ctx:
                out = engine(**batch, **kwargs)
            engine.backward(out["loss"])
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            state.examples_in_epoch += batch_rows(batch) * world
            window.add(out, batch_tokens(batch))
            if not boundary:
                continue
            state.step += 1
            window.steps += 1
            last = state.step >= settings.total_steps or deadline_passed(settings.deadline)
            stopped = last
            if state.step % settings.log_every == 0 or last:
                elapsed = time.perf_counter() - window.started
                metrics = all_reduce_mean({k: v / window.micro for k, v in window.sums.items()})
                tokens = all_reduce_sum({"t": window.tokens})["t"]
                state.tokens += tokens
                metrics.update({"lr": float(engine.get_lr()[0]), "tokens_per_s": tokens / max(elapsed, 1e-9),
                                "step_time_s": elapsed / max(1, window.steps), "epoch": float(state.epoch)})
                cb.on_log(state, metrics)
                last_metrics.update(metrics)
                window = _Window()
            if last or (settings.eval_every and state.step % settings.eval_every == 0):
                last_metrics.update(cb.on_eval(state))
                engine.train()
            if last or (settings.checkpoint_every and state.step % settings.checkpoint_every == 0):
                cb.on_checkpoint(state, dict(last_metrics))
            if window.micro == 0:
                window.started = time.perf_counter()  # eval and checkpoint time is not step time
            if last:
                break
        else:
            if not produced and state.examples_in_epoch == 0:
                raise RuntimeError("an epoch produced no batches: the dataset is smaller than one global batch")
            state.epoch += 1
            state.examples_in_epoch = 0
    return state
