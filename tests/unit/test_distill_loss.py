"""The top-k distillation losses: hand computation, k = vocabulary equals the full softmax, anchor, head-call count."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from layerexit.errors import ConfigError
from layerexit.losses.distill import (
    check_distill_settings, distill_kl_sum, distill_loss, full_kl, full_rows, teacher_topk, topk_kl,
)
from layerexit.models.exits import collect_hidden_states, decoder_parts


def _setup(model, seed=0, n=10):
    torch.manual_seed(seed)
    parts = decoder_parts(model)
    ids = torch.randint(0, model.config.vocab_size, (1, n))
    hidden = collect_hidden_states(model, ids, [2, parts.num_layers])
    return parts, hidden[2][0], hidden[parts.num_layers][0]


def test_bucket_kl_matches_hand_computation(tiny_model):
    parts, h_exit, h_final = _setup(tiny_model)
    k, T = 5, 2.0
    with torch.no_grad():
        t_logits = parts.head(parts.norm(h_final))
        ids, logp = teacher_topk(t_logits, k, T)
        mask = torch.ones(h_exit.shape[0])
        got = distill_kl_sum(h_exit, ids, logp, mask, parts.norm, parts.head.weight, T, full_every=1, chunk_size=4)
        # By hand: teacher probs at T, student probs at T, buckets = top-k ids + everything else.
        s_logits = parts.head(parts.norm(h_exit)).double()
        want = 0.0
        for i in range(h_exit.shape[0]):
            p = torch.softmax(t_logits[i].double() / T, -1)
            q = torch.softmax(s_logits[i] / T, -1)
            top = p.topk(k).indices
            pk, qk = p[top], q[top]
            kl = float((pk * (pk.log() - qk.log())).sum())
            po, qo = 1 - float(pk.sum()), 1 - float(qk.sum())
            kl += po * (math.log(po) - math.log(qo))
            want += kl * T * T
    assert float(got) == pytest.approx(want, rel=1e-4)


def test_restricted_kl_matches_hand_computation(tiny_model):
    parts, h_exit, h_final = _setup(tiny_model, seed=1)
    k = 7
    with torch.no_grad():
        t_logits = parts.head(parts.norm(h_final))
        ids, logp = teacher_topk(t_logits, k, 1.0)
        got = distill_kl_sum(h_exit, ids, logp, torch.ones(h_exit.shape[0]), parts.norm, parts.head.weight, 1.0,
                             full_every=0)
        s_logits = parts.head(parts.norm(h_exit)).double()
        want = 0.0
        for i in range(h_exit.shape[0]):
            p = torch.softmax(t_logits[i].double()[ids[i]], -1)
            q = torch.softmax(s_logits[i][ids[i]], -1)
            want += float((p * (p.log() - q.log())).sum())
    assert float(got) == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_k_equal_vocab_equals_full_softmax_values_and_gradients(tiny_model, temperature):
    parts, h_exit, h_final = _setup(tiny_model, seed=2)
    V = tiny_model.config.vocab_size
    with torch.no_grad():
        t_logits = parts.head(parts.norm(h_final))
        ids, logp = teacher_topk(t_logits, V, temperature)
    mask = torch.tensor([1.0] * 8 + [0.0] * 2)
    a = h_exit.detach().clone().requires_grad_(True)
    got = distill_kl_sum(a, ids, logp, mask, parts.norm, parts.head.weight, temperature, full_every=1, chunk_size=3)
    got.backward()
    b = h_exit.detach().clone().requires_grad_(True)
    want = (full_kl(parts.head(parts.norm(b)), t_logits, temperature) * mask).sum()
    want.backward()
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5, abs=1e-6)
    assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-7)


def test_anchor_is_zero_when_student_is_teacher(tiny_model):
    parts, h_exit, h_final = _setup(tiny_model, seed=3)
    with torch.no_grad():
        ids, logp = teacher_topk(parts.head(parts.norm(h_final)), 6, 1.5)
    out = distill_loss({2: h_exit}, ids, logp, torch.ones(h_exit.shape[0]), parts.norm, parts.head.weight, {2: 1.0},
                       temperature=1.5, full_every=2, final_hidden=h_final, anchor_weight=1.0)
    assert float(out.anchor) == pytest.approx(0.0, abs=1e-5)
    assert float(out.per_layer[2]) > 1e-3  # the exit differs from the final layer


def test_head_calls_do_not_depend_on_the_mask(tiny_model):
    """The LM head runs the same number of times whatever the labels (ZeRO-3 gathers per call)."""
    parts, h_exit, h_final = _setup(tiny_model, seed=4, n=12)
    with torch.no_grad():
        ids, logp = teacher_topk(parts.head(parts.norm(h_final)), 4, 1.0)
    calls = []
    real_linear = F.linear

    def counting(x, w, *args, **kwargs):
        if w is parts.head.weight or w.shape == parts.head.weight.shape:
            calls.append(x.shape[0])
        return real_linear(x, w, *args, **kwargs)

    counts = []
    for mask in (torch.ones(12), torch.zeros(12), torch.tensor([1.0] + [0.0] * 11)):
        calls.clear()
        F.linear = counting
        try:
            distill_kl_sum(h_exit, ids, logp, mask, parts.norm, parts.head.weight, 1.0, full_every=4, chunk_size=5)
        finally:
            F.linear = real_linear
        counts.append(list(calls))
    assert counts[0] == counts[1] == counts[2] and len(counts[0]) == 3
    assert full_rows(5, 4).tolist() == [True, False, False, False, True]


def test_bad_settings_name_the_field():
    with pytest.raises(ConfigError, match="top_k"):
        check_distill_settings(100, 50, 1.0)
    with pytest.raises(ConfigError, match="temperature"):
        check_distill_settings(10, 50, 0.0)


def test_topk_kl_other_bucket_penalises_mass_outside_topk():
    teacher = torch.log(torch.tensor([[0.5, 0.3]]))  # other = 0.2
    z = torch.tensor([[2.0, 1.5]])
    near = topk_kl(z, teacher, 1.0, torch.logsumexp(torch.tensor([[2.0, 1.5, 0.4]]), -1))
    far = topk_kl(z, teacher, 1.0, torch.logsumexp(torch.tensor([[2.0, 1.5, 5.0]]), -1))
    assert float(far) > float(near)
