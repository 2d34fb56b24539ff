"""The Ray-free training loop: LR schedule, data order and resume, the objective, LITE vs final-only training."""

from __future__ import annotations

import math

import pytest
import torch

from layerexit.data.datasets import TokenizedExample
from layerexit.losses import exit_weights
from layerexit.training.loop import (
    FrozenTeacher,
    LiteObjective,
    LoopCallbacks,
    LoopSettings,
    TorchEngine,
    TrainState,
    epoch_batches,
    eval_batches,
    eval_loss_metrics,
    lr_lambda,
    merge_alignment_reports,
    param_groups,
    train_loop,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine they spin-wait: 100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_lr_schedule_warmup_then_cosine():
    fn = lr_lambda(total_steps=10, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)
    assert fn(0) == pytest.approx(0.5) and fn(1) == pytest.approx(1.0)
    assert fn(2) == pytest.approx(1.0) and fn(10) == pytest.approx(0.1)
    assert fn(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_lambda(10, 0, "constant")(7) == 1.0 and lr_lambda(10, 0, "linear")(5) == pytest.approx(0.5)


def _examples(n: int, vocab: int = 500, seed: int = 0) -> list[TokenizedExample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        # A learnable pattern: the response repeats the prompt's last token.
        a = int(torch.randint(10, vocab, (1,), generator=g))
        ids = [3, a, 4, a, a, a, a, 5]
        out.append(TokenizedExample(ids, [-100, -100, -100, a, a, a, a, 5], 3))
    return out


def test_epoch_batches_shard_evenly_and_skip():
    ex = _examples(21)
    kwargs = dict(micro_batch=2, world=2, grad_accum=1, epoch=0, seed=1, pad_id=0)
    r0 = list(epoch_batches(ex, rank=0, **kwargs))
    r1 = list(epoch_batches(ex, rank=1, **kwargs))
    assert len(r0) == len(r1) == 5  # 21 -> 20 usable, 10 per rank, batches of 2
    seen = {tuple(row) for b in r0 + r1 for row in b["input_ids"].tolist()}
    assert len(seen) <= 20
    skipped = list(epoch_batches(ex, rank=0, skip=12, **kwargs))  # 12 examples = 3 micro-batches of 2 on 2 ranks
    assert [b["input_ids"].tolist() for b in skipped] == [b["input_ids"].tolist() for b in r0[3:]]
    other_epoch = list(epoch_batches(ex, rank=0, **{**kwargs, "epoch": 1}))
    assert [b["input_ids"].tolist() for b in other_epoch] != [b["input_ids"].tolist() for b in r0]
    assert sum(len(b["input_ids"]) for b in eval_batches(ex, micro_batch=4, world=2, rank=1, pad_id=0)) == 10


def _engine(model, weights, lr=3e-3, accum=1, anchor=0.0):
    obj = LiteObjective(model, weights, chunk_size=4, anchor_weight=anchor)
    opt = torch.optim.AdamW(param_groups(obj, 0.0), lr=lr)
    return TorchEngine(obj, opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(20, 0, "constant")), accum, 1.0)


def _train(model, weights, steps, accum=1, anchor=0.0, teacher=None, state=None, callbacks=None, data=None):
    data = data or _examples(64)
    engine = _engine(model, weights, accum=accum, anchor=anchor)

    def batches(epoch, skip):
        return epoch_batches(data, micro_batch=4, world=1, rank=0, grad_accum=accum, epoch=epoch, seed=0, pad_id=0,
                             skip=skip)

    state = train_loop(engine, batches, LoopSettings(total_steps=steps, eval_at_start=False), state, callbacks,
                       teacher)
    return engine, state


def test_loop_counts_steps_accumulation_and_epochs():
    from layerexit.models.tiny import build_tiny_llama

    model = build_tiny_llama(num_layers=2)
    logged, ckpts = [], []
    cb = LoopCallbacks(on_log=lambda s, m: logged.append((s.step, m)),
                       on_checkpoint=lambda s, m: ckpts.append(s.step))
    engine, state = _train(model, exit_weights([1], 2), steps=10, accum=2, callbacks=cb)
    # 64 examples / (4 * 2) = 8 steps per epoch -> step 10 is in epoch 1, 2 steps (4 micro-batches) in.
    assert state.step == 10 and state.epoch == 1 and state.examples_in_epoch == 16 and state.world_size == 1
    assert engine.global_steps == 10 and engine.micro_steps == 20
    assert [s for s, _ in logged] == list(range(1, 11)) and ckpts == [10]
    assert {"train/loss", "train/loss_l01", "train/loss_l02", "lr", "tokens_per_s"} <= set(logged[0][1])
    assert TrainState.from_dict(state.to_dict()) == state


def test_lite_trains_intermediate_exits_better_than_final_only():
    """The same data, steps and seed: LITE lowers the intermediate exits' held-out loss far more."""
    from layerexit.models.tiny import build_tiny_llama

    held = eval_batches(_examples(32, seed=1), micro_batch=8, world=1, rank=0, pad_id=0)
    layers = [1, 2, 3, 4]
    results = {}
    for scheme in ("uniform", "final_only"):
        model = build_tiny_llama(num_layers=4, seed=0)
        weights = exit_weights([1, 2, 3], 4, scheme)
        _train(model, weights, steps=24)
        results[scheme] = eval_loss_metrics(model, held, layers, weights, chunk_size=4)
    for l in (1, 2, 3):
        assert results["uniform"][f"eval/loss_l{l:02d}"] < results["final_only"][f"eval/loss_l{l:02d}"] - 0.1


def test_anchor_keeps_final_layer_close_to_the_start():
    from layerexit.models.tiny import build_tiny_llama

    data = _examples(64)
    start = build_tiny_llama(num_layers=4, seed=0)
    teacher = FrozenTeacher(build_tiny_llama(num_layers=4, seed=0))
    batch = eval_batches(data[:8], micro_batch=8, world=1, rank=0, pad_id=0)[0]
    kl = {}
    for anchor in (0.0, 5.0):
        model = build_tiny_llama(num_layers=4, seed=0)
        _train(model, exit_weights([1, 2], 4), steps=12, anchor=anchor, teacher=teacher, data=data)
        with torch.no_grad():
            p = torch.log_softmax(start(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits, -1)
            q = torch.log_softmax(model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits, -1)
        kl[anchor] = float(torch.nn.functional.kl_div(q, p, log_target=True, reduction="batchmean"))
    assert kl[5.0] < kl[0.0]


def test_objective_reports_anchor_and_per_layer():
    from layerexit.models.tiny import build_tiny_llama

    model = build_tiny_llama(num_layers=4, seed=0)
    teacher = FrozenTeacher(build_tiny_llama(num_layers=4, seed=0))
    batch = eval_batches(_examples(4), micro_batch=4, world=1, rank=0, pad_id=0)[0]
    out = LiteObjective(model, exit_weights([2], 4), chunk_size=3, anchor_weight=1.0)(**batch, teacher=teacher)
    assert set(out["per_layer"]) == {2, 4}
    assert float(out["anchor"]) == pytest.approx(0.0, abs=1e-5)  # identical weights: no divergence yet
    out["loss"].backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_merge_alignment_reports_is_token_weighted():
    from layerexit.evaluation.alignment import AlignmentReport, LayerAlignment

    def rep(align, tokens, counts):
        row = LayerAlignment(1, align, 0.5, tokens, counts, [align if c else None for c in counts])
        return AlignmentReport(1, 1, tokens, [0.0, 0.5, 1.0], [row])

    merged = merge_alignment_reports([rep(1.0, 10, [10, 0]), None, rep(0.0, 30, [0, 30])])
    assert merged.num_tokens == 40 and merged.rows[0].alignment == pytest.approx(0.25)
    assert merged.rows[0].bin_counts == [10, 30] and merged.rows[0].bin_alignment == [1.0, 0.0]


def test_deadline_ends_training_at_the_step_that_passes_it():
    """optim.max_minutes: the step that ends after the deadline is the last one, evaluated and checkpointed."""
    import time

    from layerexit.models.tiny import build_tiny_llama

    model = build_tiny_llama(num_layers=2)
    engine = _engine(model, exit_weights([1], 2))
    evals, ckpts = [], []
    cb = LoopCallbacks(on_eval=lambda s: evals.append(s.step) or {}, on_checkpoint=lambda s, m: ckpts.append(s.step))

    def batches(epoch, skip):
        return epoch_batches(_examples(64), micro_batch=4, world=1, rank=0, grad_accum=1, epoch=epoch, seed=0,
                             pad_id=0, skip=skip)

    state = train_loop(engine, batches, LoopSettings(total_steps=50, eval_at_start=False, deadline=time.time() - 1),
                       None, cb)
    assert state.step == 1 and evals == [1] and ckpts == [1]
    state = train_loop(_engine(model, exit_weights([1], 2)), batches,
                       LoopSettings(total_steps=3, eval_at_start=False, deadline=time.time() + 3600))
    assert state.step == 3
