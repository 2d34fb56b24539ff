"""The LITE training loop and held-out evaluation. No Ray imports: the loop takes an engine, batches, settings and
callbacks, so it runs under Ray Train + DeepSpeed (``ray_trainer``), in a plain process (``TorchEngine``), or in a
benchmark.

An *engine* is anything with DeepSpeed's training surface: ``engine(**batch) -> {"loss", ...}``,
``engine.backward(loss)``, ``engine.is_gradient_accumulation_boundary()``, ``engine.step()``, ``engine.get_lr()``
and ``engine.module`` (a ``LiteObjective``). ``torch.distributed`` (when initialised) reduces metrics across ranks.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from layerexit.data.datasets import IGNORE_INDEX, TokenizedExample, collate
from layerexit.evaluation.alignment import AlignmentReport, LayerAlignment, alignment_from_generations
from layerexit.losses import chunked_exit_cross_entropy, lite_loss
from layerexit.models.exits import collect_hidden_states, decoder_parts, exit_hidden

# ----------------------------------------------------------------------------------------------- objective


class FrozenTeacher:
    """A frozen copy of the starting model, the reference for the anchor KL. Deliberately not an ``nn.Module``
    attribute of the objective, so DeepSpeed neither partitions nor optimises it."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.parts = decoder_parts(self.model)

    @torch.no_grad()
    def final_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        L = self.parts.num_layers
        return collect_hidden_states(self.model, input_ids, [L], attention_mask)[L]

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.parts.head(self.parts.norm(hidden))


def _anchor_chunk(hidden: torch.Tensor, teacher_logp: torch.Tensor, labels: torch.Tensor, norm: Callable,
                  head: Callable) -> torch.Tensor:
    # Shape: hidden (B, c, H), teacher_logp (B, c, V), labels (B, c) -> scalar sum over response positions
    student = F.log_softmax(head(norm(hidden)).float(), dim=-1)
    kl = F.kl_div(student, teacher_logp, log_target=True, reduction="none").sum(-1)  # Shape: (B, c)
    return (kl * (labels != IGNORE_INDEX)).sum()


def anchor_kl(hidden: torch.Tensor, teacher_hidden: torch.Tensor, labels: torch.Tensor, norm: Callable,
              head: Callable, teacher_logits: Callable[[torch.Tensor], torch.Tensor],
              chunk_size: int | None = 128) -> torch.Tensor:
    """Mean over response tokens of KL(teacher final layer || student final layer), chunked like the LITE loss."""
    # Shape: position t predicts label t+1 -> hidden (B, T-1, H), labels (B, T-1)
    hidden, teacher_hidden, labels = hidden[:, :-1], teacher_hidden[:, :-1], labels[:, 1:]
    n_valid = int((labels != IGNORE_INDEX).sum())
    total = hidden.new_zeros((), dtype=torch.float32)
    step = chunk_size or hidden.shape[1]
    for start in range(0, hidden.shape[1], step):
        sl = slice(start, start + step)
        # No skipping of label-free chunks: head calls per micro-batch must not depend on the data (ZeRO-3,
        # see layerexit.losses.lite).
        t_logp = F.log_softmax(teacher_logits(teacher_hidden[:, sl]).float(), dim=-1)  # Shape: (B, c, V)
        if torch.is_grad_enabled() and hidden.requires_grad:
            total = total + checkpoint(_anchor_chunk, hidden[:, sl], t_logp, labels[:, sl], norm, head,
                                       use_reentrant=False)
        else:
            total = total + _anchor_chunk(hidden[:, sl], t_logp, labels[:, sl], norm, head)
    return total / max(n_valid, 1)


class LiteObjective(nn.Module):
    """Wraps a stock HF causal LM; ``forward`` returns the LITE loss and its parts. This is what DeepSpeed wraps,
    so the forward goes through ``engine(...)`` and its gradient-accumulation hooks."""

    def __init__(self, model: nn.Module, weights: Mapping[int, float], chunk_size: int | None = 128,
                 distill_weight: float = 0.0, anchor_weight: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.weights = dict(weights)
        self.chunk_size = chunk_size
        self.distill_weight = distill_weight
        self.anchor_weight = anchor_weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                teacher: FrozenTeacher | None = None) -> dict:
        parts = decoder_parts(self.model)
        L = parts.num_layers
        hidden = collect_hidden_states(self.model, input_ids, self.weights.keys(), attention_mask)
        out = lite_loss(hidden, labels, parts.norm, parts.head, self.weights, self.chunk_size, self.distill_weight)
        result = {"loss": out.loss, "per_layer": out.per_layer, "distill": out.distill,
                  "num_tokens": torch.tensor(float(out.num_tokens))}
        if self.anchor_weight > 0 and teacher is not None:
            t_hidden = teacher.final_hidden(input_ids, attention_mask)
            kl = anchor_kl(hidden[L], t_hidden, labels, parts.norm, parts.head, teacher.logits, self.chunk_size)
            result["loss"] = out.loss + self.anchor_weight * kl
            result["anchor"] = kl.detach()
        return result


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


# ----------------------------------------------------------------------------------------------- data order


def steps_per_epoch(num_examples: int, micro_batch: int, world: int, grad_accum: int) -> int:
    """Optimizer steps per epoch; the tail that does not fill a whole global step is dropped."""
    return num_examples // (micro_batch * world * grad_accum)


def pad_to_width(batch: dict[str, torch.Tensor], width: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a collated micro-batch to ``width`` columns (padding: ``pad_id``, label -100, mask 0)."""
    extra = width - batch["input_ids"].shape[1]
    if extra <= 0:
        return batch
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": 0}
    return {k: F.pad(v, (0, extra), value=fill.get(k, 0)) for k, v in batch.items()}


def shared_widths(shards: Sequence[Sequence[TokenizedExample]], micro_batch: int) -> list[int]:
    """Width of micro-batch b = the longest example in micro-batch b of ANY rank's shard.

    Every rank computes the same list from the same (seeded) order, without communication, so micro-batch b has
    the same shape on every rank and the LM head is called the same number of times (the ZeRO-3 invariant in
    ``layerexit.losses.lite``): a rank whose batch is short pads to the width of the longest one.
    """
    n_batches = max((-(-len(s) // micro_batch) for s in shards), default=0)
    return [max((len(e.input_ids) for s in shards for e in s[b * micro_batch : (b + 1) * micro_batch]), default=1)
            for b in range(n_batches)]


def epoch_order(num_examples: int, *, epoch: int, seed: int, lengths: Sequence[int] | None = None,
                group_size: int = 0) -> list[int]:
    """The global order of one epoch's examples: a seeded shuffle, then (``lengths`` and ``group_size`` > 1) each
    window of ``group_size`` consecutive examples sorted longest first (length grouping: a global batch holds
    examples of similar length, so little of it is padding, while windows stay in random order).

    It depends on the data, the seed and the epoch only, not on the number of ranks or the batch size, so a position
    in it (``TrainState.examples_in_epoch``) means the same thing on any cluster size (resume on another world size).
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_examples, generator=g).tolist()
    if lengths is None or group_size <= 1:
        return order
    out: list[int] = []
    for start in range(0, len(order), group_size):
        window = order[start : start + group_size]
        out.extend(sorted(window, key=lambda i: -lengths[i]))  # stable: ties keep their shuffled order
    return out


def rank_share(order: Sequence[int], *, skip: int, per_step: int, world: int, rank: int) -> list[int]:
    """This rank's indices from ``order`` after the first ``skip`` (global) examples: the whole global steps that
    remain, dealt out round-robin (example j of the rest goes to rank j % world). Dealing consecutive examples to
    different ranks keeps micro-batch b of every rank in the same stretch of a length-sorted window."""
    rest = list(order[skip:])
    usable = (len(rest) // per_step) * per_step
    return rest[:usable][rank::world]


def epoch_shards(examples: Sequence[TokenizedExample], *, micro_batch: int, world: int, grad_accum: int,
                 epoch: int, seed: int, skip: int = 0, group_size: int = 0) -> list[list[TokenizedExample]]:
    """Every rank's examples for one epoch after the first ``skip`` examples of the epoch (global count, all ranks):
    ``epoch_order`` (length-grouped when ``group_size`` > 1), an equal share per rank, whole global steps only."""
    per_step = micro_batch * world * grad_accum
    order = epoch_order(len(examples), epoch=epoch, seed=seed, group_size=group_size,
                        lengths=[len(e.input_ids) for e in examples] if group_size > 1 else None)
    return [[examples[i] for i in rank_share(order, skip=skip, per_step=per_step, world=world, rank=r)]
            for r in range(world)]


def epoch_batches(examples: Sequence[TokenizedExample], *, micro_batch: int, world: int, rank: int,
                  grad_accum: int, epoch: int, seed: int, pad_id: int, skip: int = 0, group_size: int = 0,
                  device: torch.device | str = "cpu") -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches of ``epoch_shards``. Micro-batch b has the same width on every rank
    (``shared_widths``)."""
    shards = epoch_shards(examples, micro_batch=micro_batch, world=world, grad_accum=grad_accum, epoch=epoch,
                          seed=seed, skip=skip, group_size=group_size)
    widths = shared_widths(shards, micro_batch)
    mine = shards[rank]
    for b, start in enumerate(range(0, len(mine), micro_batch)):
        batch = pad_to_width(collate(mine[start : start + micro_batch], pad_id), widths[b], pad_id)
        yield {k: v.to(device) for k, v in batch.items()}


def padding_share(examples: Sequence[TokenizedExample], *, micro_batch: int, world: int, grad_accum: int,
                  epoch: int, seed: int, group_size: int = 0) -> float:
    """Share of the tokens of one epoch's micro-batches (all ranks) that are padding, as ``epoch_batches`` pads
    them (without building the tensors)."""
    shards = epoch_shards(examples, micro_batch=micro_batch, world=world, grad_accum=grad_accum, epoch=epoch,
                          seed=seed, group_size=group_size)
    widths = shared_widths(shards, micro_batch)
    real = sum(len(e.input_ids) for s in shards for e in s)
    padded = sum(w * len(s[b * micro_batch : (b + 1) * micro_batch]) for s in shards for b, w in enumerate(widths))
    return 1.0 - real / padded if padded else 0.0


def eval_batches(examples: Sequence[TokenizedExample], *, micro_batch: int, world: int, rank: int, pad_id: int,
                 device: torch.device | str = "cpu") -> list[dict[str, torch.Tensor]]:
    """This rank's share of the held-out examples: every rank gets the same number of batches, and batch b has
    the same width on every rank (``shared_widths``)."""
    per_rank = len(examples) // world if world > 1 else len(examples)
    shards = [list(examples[r::world])[:per_rank] for r in range(world)]
    widths = shared_widths(shards, micro_batch)
    mine = shards[rank]
    out = []
    for b, start in enumerate(range(0, len(mine), micro_batch)):
        batch = pad_to_width(collate(mine[start : start + micro_batch], pad_id), widths[b], pad_id)
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


# ----------------------------------------------------------------------------------------------- distributed helpers


def world_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(values: Mapping[str, float]) -> dict[str, float]:
    """Sum scalar values across ranks (identity without torch.distributed)."""
    keys = sorted(values)
    if not keys:
        return {}
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
    return {k: float(v) for k, v in zip(keys, t.cpu().tolist(), strict=True)}


def all_reduce_mean(values: Mapping[str, float]) -> dict[str, float]:
    _, world = world_info()
    return {k: v / world for k, v in all_reduce_sum(values).items()}


# ----------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def exit_losses(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], layers: Sequence[int],
                chunk_size: int | None = 128, autocast: bool = False) -> dict[int, tuple[float, int]]:
    """Per-layer (sum of token cross-entropies, token count) over batches, through the final norm and LM head."""
    parts = decoder_parts(model)
    sums = {l: 0.0 for l in layers}
    count = 0
    for batch in batches:
        device_type = batch["input_ids"].device.type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            hidden = collect_hidden_states(model, batch["input_ids"], layers, batch["attention_mask"])
            n = 0
            for l in layers:
                h = exit_hidden(parts, l, hidden[l])  # through the exit's adapter when it has one
                s, n = chunked_exit_cross_entropy(h, batch["labels"], parts.norm, parts.head, chunk_size)
                sums[l] += float(s)
        count += n
    return {l: (sums[l], count) for l in layers}


def eval_loss_metrics(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], layers: Sequence[int],
                      weights: Mapping[int, float], chunk_size: int | None = 128,
                      autocast: bool = False) -> dict[str, float]:
    """``eval/loss_l{l:02d}`` per layer (token-mean over all ranks) and ``eval/loss`` (LITE-weighted over ``weights``)."""
    need = sorted(set(layers) | set(weights))
    local = exit_losses(model, batches, need, chunk_size, autocast)
    flat = {f"s{l}": s for l, (s, _) in local.items()}
    flat["n"] = next(iter(local.values()))[1] if local else 0
    total = all_reduce_sum(flat)
    n = max(total["n"], 1.0)
    per_layer = {l: total[f"s{l}"] / n for l in need}
    metrics = {f"eval/loss_l{l:02d}": per_layer[l] for l in sorted(layers)}
    wsum = sum(weights.values())
    metrics["eval/loss"] = sum(per_layer[l] * w for l, w in weights.items()) / wsum
    metrics["eval/tokens"] = total["n"]
    return metrics


def merge_alignment_reports(reports: Sequence[AlignmentReport | None]) -> AlignmentReport | None:
    """Combine reports computed on disjoint prompt shards (token-weighted)."""
    reports = [r for r in reports if r is not None and r.num_tokens > 0]
    if not reports:
        return None
    first = reports[0]
    rows = []
    for i, row in enumerate(first.rows):
        parts = [r.rows[i] for r in reports]
        tokens = sum(p.tokens for p in parts)
        bins = len(row.bin_counts)
        counts = [sum(p.bin_counts[b] for p in parts) for b in range(bins)]
        matched = [sum((p.bin_alignment[b] or 0.0) * p.bin_counts[b] for p in parts) for b in range(bins)]
        rows.append(LayerAlignment(
            layer=row.layer,
            alignment=sum(p.alignment * p.tokens for p in parts) / tokens if tokens else 0.0,
            mean_confidence=sum(p.mean_confidence * p.tokens for p in parts) / tokens if tokens else 0.0,
            tokens=tokens,
            bin_counts=counts,
            bin_alignment=[m / c if c else None for m, c in zip(matched, counts, strict=True)],
        ))
    return AlignmentReport(num_layers=first.num_layers, num_prompts=sum(r.num_prompts for r in reports),
                           num_tokens=sum(r.num_tokens for r in reports), bin_edges=first.bin_edges, rows=rows)


def sharded_alignment(model: nn.Module, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int,
                      eos: set[int], batch_size: int = 8) -> AlignmentReport | None:
    """Alignment of every layer with the final layer; each rank takes every world-th prompt, results merged."""
    from layerexit.engine.reference import hf_greedy_generate_batched

    rank, world = world_info()
    mine = [list(p) for p in prompt_ids[rank::world]]
    report = None
    if mine:
        responses = hf_greedy_generate_batched(model, mine, max_new_tokens, pad_id, batch_size=batch_size, eos=eos,
                                               show_progress=False)
        report = alignment_from_generations(model, mine, responses, show_progress=False)
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, report)
        return merge_alignment_reports(gathered)
    return merge_alignment_reports([report])


def alignment_metrics(report: AlignmentReport | None, conf_layers: Sequence[int] = ()) -> dict[str, float]:
    """``align/l{l:02d}`` for every layer and ``conf/l{l:02d}`` (zero-padded: the MLflow UI sorts them by layer) (mean top-1 probability) for ``conf_layers``."""
    if report is None:
        return {}
    out = {f"align/l{r.layer:02d}": r.alignment for r in report.rows}
    out.update({f"conf/l{r.layer:02d}": r.mean_confidence for r in report.rows if r.layer in conf_layers})
    return out


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
