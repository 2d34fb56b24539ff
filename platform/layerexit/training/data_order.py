"""The order examples are trained in: epochs shuffled by seed (length-grouped), each step's share per rank,
micro-batches padded to widths every rank shares, so a run resumes mid-epoch on any number of ranks."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from layerexit.data.datasets import IGNORE_INDEX, TokenizedExample, collate


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
