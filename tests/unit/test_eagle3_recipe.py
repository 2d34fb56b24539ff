"""recipe: eagle3 on the tiny model: the aux-feature cache, the training-time-test loss, held-out acceptance
counting, the draft vocabulary, and settings that are refused with the field named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from layerexit.data.datasets import TokenizedExample
from layerexit.data.teacher_cache import build_teacher_cache
from layerexit.errors import ConfigError
from layerexit.losses.eagle3 import step_weights, teacher_in_draft_vocab, ttt_loss
from layerexit.training import eagle3_recipe as er

AUX = [1, 2, 3]


def _examples(vocab: int, n: int = 6, prompt: int = 4) -> list[TokenizedExample]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = torch.randint(3, vocab, (10 + i,), generator=g).tolist()
        out.append(TokenizedExample(ids, [-100] * prompt + ids[prompt:], prompt))
    return out


def test_aux_feature_cache_equals_the_models_hidden_states(tiny_model_and_tokenizer, tmp_path):
    """positions='all': every position of every sequence, in order, with HF's hidden_states[a] at each aux layer."""
    model, tok = tiny_model_and_tokenizer
    examples = _examples(model.config.vocab_size)
    cache = build_teacher_cache("tiny", examples, k=4, layers=AUX, precision="fp32", directory=tmp_path / "c",
                                model_and_tokenizer=(model, tok), positions="all")
    assert cache.num_positions == sum(len(e.input_ids) for e in examples)
    rows = er.sequence_rows(cache, len(examples))
    for ex, (start, n) in zip(examples, rows, strict=True):
        assert n == len(ex.input_ids)
        assert cache.pos[start : start + n].tolist() == list(range(n))
        with torch.no_grad():
            out = model(torch.tensor([ex.input_ids]), output_hidden_states=True)
        for a in AUX:
            assert torch.allclose(cache.hidden[a][start : start + n].float(), out.hidden_states[a][0],
                                  atol=3e-2, rtol=2e-2), a
        top = torch.log_softmax(out.logits[0].float(), -1).topk(4)
        assert torch.equal(cache.ids[start : start + n].long(), top.indices)
    # A response-position cache of the same data is another cache (the fingerprint records the kind).
    other = build_teacher_cache("tiny", examples, k=4, layers=AUX, precision="fp32", model_and_tokenizer=(model, tok))
    assert other.num_positions < cache.num_positions
    batch = er.eagle3_batch(examples[:2], rows[:2], cache, AUX, 12, tok.pad_token_id)
    h = model.config.hidden_size
    assert batch["aux"].shape == (2, 12, 3 * h) and batch["teacher_ids"].shape == (2, 12, 4)
    assert torch.equal(batch["aux"][1, :11, h: 2 * h], cache.hidden[2][rows[1][0]: rows[1][0] + 11])


def test_teacher_restricted_to_the_draft_vocabulary():
    table = torch.full((10,), -1, dtype=torch.long)
    table[torch.tensor([2, 5, 7])] = torch.tensor([0, 1, 2])
    ids = torch.tensor([[5, 3, 7], [1, 3, 4]])
    logp = torch.log(torch.tensor([[0.5, 0.3, 0.1], [0.6, 0.2, 0.1]]))
    d, p, has = teacher_in_draft_vocab(ids, logp, table)
    assert has.tolist() == [True, False]
    assert d[0].tolist() == [1, 0, 2]
    assert torch.allclose(p[0], torch.tensor([0.5 / 0.6, 0.0, 0.1 / 0.6]))
    assert p[1].sum() == 0


def test_training_time_test_loss_decreases(tiny_model_and_tokenizer, tmp_path):
    model, tok = tiny_model_and_tokenizer
    examples = _examples(model.config.vocab_size)
    cache = build_teacher_cache("tiny", examples, k=8, layers=AUX, precision="fp32", directory=tmp_path / "c",
                                model_and_tokenizer=(model, tok), positions="all")
    rows = er.sequence_rows(cache, len(examples))
    vocab = er.draft_vocabulary(examples, 64, model.config.vocab_size, cache.ids[:, 0])
    draft = er.new_draft(model, AUX, vocab, seed=0)
    objective = er.Eagle3Objective(model, draft, steps=3, decay=0.8)
    assert [n for n, p in objective.named_parameters() if p.requires_grad] and all(
        n.startswith("draft.") for n, _ in objective.named_parameters())  # the base is not registered
    batch = er.eagle3_batch(examples, rows, cache, AUX, max(len(e.input_ids) for e in examples), tok.pad_token_id)
    opt = torch.optim.AdamW(objective.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        out = objective(**batch)
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out["loss"].detach()))
    assert set(out["metrics"]) >= {"ttt_loss_s0", "ttt_loss_s1", "ttt_loss_s2", "ttt_acc_s0"}
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(not p.requires_grad for p in model.parameters())


def test_ttt_loss_scores_step_j_against_the_teacher_j_plus_1_ahead():
    """A draft whose step j puts all mass on the teacher's token at position 1 + i + j has zero loss."""
    b, t, vd, k = 1, 6, 5, 1
    ids = torch.randint(0, vd, (b, t, k))
    probs = torch.ones(b, t, k)
    mask = torch.ones(b, t, dtype=torch.bool)
    logits = []
    for j in range(3):
        z = torch.full((b, t - 1, vd), -30.0)
        for i in range(t - 1 - j):
            z[0, i, ids[0, 1 + i + j, 0]] = 30.0
        logits.append(z)
    out = ttt_loss(logits, ids, probs, mask, step_weights(3, 0.8))
    assert float(out.loss) < 1e-6 and all(float(a) == 1.0 for a in out.accuracy.values())
    assert out.positions == {0: 5, 1: 4, 2: 3}


class _StubDraft:
    """Predictions given per (start, step): enough of Eagle3Draft for ``draft_acceptance``."""

    def __init__(self, predictions: torch.Tensor, vocab: int) -> None:
        self.preds, self.vocab = predictions, vocab  # (T-1, K) target ids
        self.fc = torch.nn.Linear(1, 1)
        self.draft_to_target = torch.arange(vocab)
        self.training = False

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def embed(self, ids):
        return torch.zeros(*ids.shape, 1)

    def fuse(self, aux):
        return aux[..., :1]

    def unrolled(self, embeds, fused, positions, steps):
        return [torch.nn.functional.one_hot(self.preds[:, j], self.vocab).float()[None] for j in range(steps)]


def test_acceptance_counts_leading_steps_and_the_bonus_token():
    t, vocab, k = 9, 20, 2
    greedy = torch.arange(t) + 1  # the target's greedy token at position t (predicts x_{t+1})
    seq = er.HeldoutSequence(torch.arange(t), torch.zeros(t, 3), greedy, prompt_len=2)
    preds = torch.zeros(t - 1, k, dtype=torch.long)
    for i in range(t - 1):
        for j in range(k):
            preds[i, j] = greedy[min(i + 1 + j, t - 1)]  # a perfect draft
    # starts i = 1..t-2-k = 1..5; break start 2 at step 0 and start 3 at step 1
    preds[2, 0] = 0
    preds[3, 1] = 0
    acc = er.draft_acceptance(_StubDraft(preds, vocab), [seq], max_draft=k)
    assert acc.starts == 5
    assert acc.per_position == [4 / 5, 3 / 4]
    assert acc.tau[1] == pytest.approx(1 + 4 / 5)
    assert acc.tau[2] == pytest.approx(1 + (0 + 1 + 2 + 2 + 2) / 5)
    assert acc.best_k(0.0) == 2 and acc.best_k(10.0) == 1


def test_draft_vocabulary_counts_answers_and_greedy_tokens():
    examples = [TokenizedExample([1, 2, 3, 3, 4], [-100, -100, 3, 3, 4], 2)]
    assert er.draft_vocabulary(examples, 2, 10) == [3, 4]
    assert er.draft_vocabulary(examples, 2, 10, torch.tensor([7, 7, 7])) == [3, 7]


def _cfg(tmp_path: Path, **over):
    from layerexit.training.config import TrainConfig

    base = {"name": "e3", "model": {"spec": str(tmp_path)}, "recipe": "eagle3"}
    for key, value in over.items():
        section, _, field = key.partition(".")
        base.setdefault(section, {})[field] = value
    return TrainConfig.model_validate(base)


def test_bad_settings_name_the_field(tiny_dir):
    from layerexit.training.config import validate_train_config

    cfg = _cfg(tiny_dir, **{"eagle3.aux_layers": [1, 4]})  # the tiny model has 4 layers: 1..3 are aux candidates
    with pytest.raises(ConfigError, match=r"eagle3.aux_layers: \[4\] out of range"):
        validate_train_config(cfg)
    with pytest.raises(ConfigError, match="eagle3.vocab_size=.* larger than the model's vocabulary"):
        validate_train_config(_cfg(tiny_dir, **{"eagle3.vocab_size": 10**6}))
    with pytest.raises(Exception, match="draft.choose"):
        _cfg(tiny_dir, **{"draft.choose": True})
    assert validate_train_config(_cfg(tiny_dir, **{"eagle3.vocab_size": 64})) == 4  # vLLM's default aux layers (2, N/2, N-3)
