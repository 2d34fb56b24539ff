"""The ZeRO-3 invariant (issue 15): every rank calls the LM head the same number of times per micro-batch.

ZeRO-3 all-gathers the head's weights collectively on each call (forward, and again when activation checkpointing
recomputes a chunk in backward), so ranks with different call counts deadlock. Batches of one micro-step have one
width on every rank (``shared_widths``) and no loss skips label-free chunks, so the count is a function of the
shape (``head_calls_per_micro_batch``). These tests count real calls of a real ``nn.Linear`` head.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from layerexit.data.datasets import IGNORE_INDEX, TokenizedExample
from layerexit.losses import lite_loss
from layerexit.losses.lite import head_calls_per_micro_batch
from layerexit.training.loop import anchor_kl, epoch_batches, eval_batches, shared_widths

H, V, CHUNK = 16, 40, 8


def examples(n: int = 24, seed: int = 0) -> list[TokenizedExample]:
    """Very different lengths (4..80 tokens); labels only on each row's last few tokens, so the long rows have
    many label-free chunks at the front."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.choice([4, 5, 6, 70, 80])
        answer = rng.randint(1, 3)
        ids = [rng.randrange(V) for _ in range(length)]
        labels = [IGNORE_INDEX] * (length - answer) + ids[length - answer:]
        out.append(TokenizedExample(ids, labels, length - answer))
    return out


class CountingHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(H, V, bias=False)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.proj(x)


def head_calls(batch: dict[str, torch.Tensor], layers: tuple[int, ...] = (1, 2, 3), distill: float = 0.0) -> int:
    """Head calls of one LITE forward + backward (checkpoint recomputation included) on ``batch``."""
    torch.manual_seed(0)
    head, norm = CountingHead(), nn.LayerNorm(H)
    B, T = batch["input_ids"].shape
    hidden = {l: torch.randn(B, T, H, requires_grad=True) for l in layers}
    out = lite_loss(hidden, batch["labels"], norm, head, {l: 1.0 for l in layers}, CHUNK, distill)
    out.loss.backward()
    return head.calls


def rank_batches(world: int = 2, **kw) -> list[list[dict[str, torch.Tensor]]]:
    data = examples()
    return [list(epoch_batches(data, micro_batch=2, world=world, rank=r, grad_accum=2, epoch=0, seed=3, pad_id=0,
                               **kw)) for r in range(world)]


def test_ranks_get_one_width_per_micro_batch_even_with_very_different_lengths() -> None:
    per_rank = rank_batches()
    assert len(per_rank[0]) == len(per_rank[1]) > 0
    own_widths = []
    for b0, b1 in zip(*per_rank, strict=True):
        assert b0["input_ids"].shape[1] == b1["input_ids"].shape[1]
        own_widths.append({int(b["attention_mask"].sum(1).max()) for b in (b0, b1)})
    assert any(len(w) == 2 for w in own_widths), "the data should give ranks different natural widths"


@pytest.mark.parametrize("distill", [0.0, 0.5], ids=["lite", "lite+distill"])
def test_head_calls_are_equal_on_every_rank(distill: float) -> None:
    per_rank = rank_batches()
    for b0, b1 in zip(*per_rank, strict=True):
        c0, c1 = head_calls(b0, distill=distill), head_calls(b1, distill=distill)
        assert c0 == c1, f"rank 0 calls the head {c0} times, rank 1 {c1} times"
        # forward + one recomputation of every checkpointed chunk; the forward count is a function of the shape
        forward = head_calls_per_micro_batch(b0["input_ids"].shape[1], 3, CHUNK, distill=distill > 0)
        assert c0 == 2 * forward


def test_label_free_chunks_still_call_the_head() -> None:
    ids = torch.arange(33).remainder(V).unsqueeze(0)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, -2:] = ids[0, -2:]  # only the last chunk has labels
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    all_labels = {**batch, "labels": ids.clone()}
    assert head_calls(batch) == head_calls(all_labels)


def test_anchor_kl_calls_the_head_once_per_chunk_whatever_the_labels() -> None:
    counts = []
    for labelled in (slice(-2, None), slice(None)):
        head, norm = CountingHead(), nn.LayerNorm(H)
        labels = torch.full((1, 33), IGNORE_INDEX)
        labels[0, labelled] = 1
        hidden = torch.randn(1, 33, H, requires_grad=True)
        with torch.no_grad():
            teacher = torch.randn(1, 33, H)
        anchor_kl(hidden, teacher, labels, norm, head, lambda h: torch.zeros(*h.shape[:2], V), CHUNK)
        counts.append(head.calls)
    assert counts[0] == counts[1] == 4  # ceil(32 / 8) chunks


def test_eval_batches_share_widths_and_counts() -> None:
    data = examples(n=13, seed=1)
    per_rank = [eval_batches(data, micro_batch=2, world=3, rank=r, pad_id=0) for r in range(3)]
    assert len({len(b) for b in per_rank}) == 1
    for group in zip(*per_rank, strict=True):
        assert len({b["input_ids"].shape for b in group}) == 1


def test_shared_widths_are_the_longest_row_of_each_micro_step() -> None:
    data = examples(n=8, seed=2)
    shards = [data[0::2], data[1::2]]
    widths = shared_widths(shards, micro_batch=2)
    for b, width in enumerate(widths):
        rows = [e for s in shards for e in s[2 * b : 2 * b + 2]]
        assert width == max(len(e.input_ids) for e in rows)


def test_padding_keeps_the_loss_value() -> None:
    """Extra padding columns carry no labels: the loss is the one of the unpadded batch."""
    single = list(epoch_batches(examples(), micro_batch=2, world=1, rank=0, grad_accum=1, epoch=0, seed=3, pad_id=0))
    batch = single[0]
    T = batch["input_ids"].shape[1]
    padded = {k: torch.nn.functional.pad(v, (0, 9), value=IGNORE_INDEX if k == "labels" else 0)
              for k, v in batch.items()}
    torch.manual_seed(1)
    head, norm = CountingHead(), nn.LayerNorm(H)
    hidden = torch.randn(2, T + 9, H)
    a = lite_loss({1: hidden[:, :T]}, batch["labels"], norm, head, {1: 1.0}, CHUNK).loss
    b = lite_loss({1: hidden}, padded["labels"], norm, head, {1: 1.0}, CHUNK).loss
    torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------- length grouping


@pytest.mark.parametrize("world", [2, 4])
def test_length_grouping_keeps_head_calls_equal_on_every_rank_and_lowers_padding(world: int) -> None:
    """Grouped by length, micro-step b still has one width on every rank (so equal head calls: the ZeRO-3 hang
    guard), and the epoch's micro-batches carry less padding than without grouping."""
    from layerexit.training.loop import padding_share

    data = examples(n=96, seed=4)
    grouped = rank_batches(world, group_size=32) if world == 2 else [
        list(epoch_batches(data, micro_batch=2, world=world, rank=r, grad_accum=2, epoch=0, seed=3, pad_id=0,
                           group_size=32)) for r in range(world)]
    assert len({len(b) for b in grouped}) == 1 and len(grouped[0]) > 0
    for step in zip(*grouped, strict=True):
        assert len({b["input_ids"].shape[1] for b in step}) == 1
        counts = {head_calls(b) for b in step}
        assert len(counts) == 1, f"head calls per rank differ: {counts}"
    kw = dict(micro_batch=2, world=world, grad_accum=2, epoch=0, seed=3)
    plain, grouped_share = padding_share(data, **kw), padding_share(data, group_size=32, **kw)
    assert grouped_share < 0.5 * plain, (plain, grouped_share)


def test_length_grouping_sorts_within_windows_and_keeps_every_example() -> None:
    from layerexit.training.loop import epoch_order

    lengths = [random.Random(i).randint(1, 100) for i in range(50)]
    order = epoch_order(50, epoch=1, seed=0, lengths=lengths, group_size=16)
    assert sorted(order) == list(range(50))
    for start in range(0, 50, 16):
        window = [lengths[i] for i in order[start : start + 16]]
        assert window == sorted(window, reverse=True)
    assert set(order[:16]) == set(epoch_order(50, epoch=1, seed=0)[:16])  # the windows of the plain shuffle


# ----------------------------------------------------------------------------------------------- world-size-free position


@pytest.mark.parametrize("group_size", [0, 16])
def test_position_in_examples_continues_exactly_on_another_world_size(group_size: int) -> None:
    """After 2 global steps on 2 ranks (16 examples), 1 rank (or 4) resumes at example 16 of the same order: the
    examples it trains on next are exactly the ones 2 ranks would have trained on next, none repeated or skipped."""
    data = examples(n=64, seed=5)
    key = {tuple(e.input_ids): i for i, e in enumerate(data)}

    def seen(world: int, skip: int) -> list[set[int]]:
        """Examples of each global step, all ranks together."""
        per_rank = [list(epoch_batches(data, micro_batch=2, world=world, rank=r, grad_accum=2, epoch=0, seed=3,
                                       pad_id=0, skip=skip, group_size=group_size)) for r in range(world)]
        steps = []
        for s in range(0, len(per_rank[0]), 2):  # grad_accum 2: two micro-batches per step
            ids = set()
            for r in range(world):
                for b in per_rank[r][s : s + 2]:
                    for row, mask in zip(b["input_ids"].tolist(), b["attention_mask"].tolist(), strict=True):
                        ids.add(key[tuple(row[: sum(mask)])])
            steps.append(ids)
        return steps

    two = seen(2, 0)  # 8 examples per step
    done = set().union(*two[:2])
    one = seen(1, 16)  # 4 examples per step
    four = seen(4, 16)  # 16 examples per step
    assert set().union(*one) == set().union(*two[2:])  # the rest of the epoch, 48 examples
    assert not done & set().union(*one) and not done & set().union(*four)
    assert set().union(*one[:2]) == two[2]  # the next 8 examples, whatever the world size
    assert set().union(*four[:1]) == two[2] | two[3]
