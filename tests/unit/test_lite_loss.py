"""LITE loss: equals the model's own loss for final_only, the hand-computed weighted mean with exits,
reaches every layer below an exit, and the chunked path matches the unchunked one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from layerexit.errors import ConfigError
from layerexit.losses import exit_weights, lite_loss
from layerexit.models.exits import collect_hidden_states, decoder_parts


def _batch(vocab=512, b=3, t=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, t), generator=g)
    labels = ids.clone()
    labels[:, :7] = -100  # prompt tokens
    labels[1, 15:] = -100  # padding
    return ids, labels


def _loss(model, ids, labels, exit_layers, scheme="uniform", chunk=4, distill=0.0):
    parts = decoder_parts(model)
    L = parts.num_layers
    weights = exit_weights(exit_layers, L, scheme)
    hidden = collect_hidden_states(model, ids, weights.keys())
    return lite_loss(hidden, labels, parts.norm, parts.head, weights, chunk_size=chunk, distill_weight=distill)


def test_final_only_equals_model_loss(tiny_model):
    ids, labels = _batch()
    ours = _loss(tiny_model, ids, labels, [], "final_only").loss
    theirs = tiny_model(input_ids=ids, labels=labels).loss
    assert torch.allclose(ours, theirs, atol=1e-5), (ours, theirs)


def test_all_exits_equal_hand_computed_weighted_mean(tiny_model):
    ids, labels = _batch()
    out = tiny_model(input_ids=ids, output_hidden_states=True)
    parts = decoder_parts(tiny_model)
    shifted = labels[:, 1:].flatten()

    def ce(logits):
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), shifted, ignore_index=-100)

    per_layer = {l: ce(parts.head(parts.norm(out.hidden_states[l]))) for l in (1, 2, 3)}
    per_layer[4] = ce(out.logits)
    for scheme, w in (("uniform", {1: 1, 2: 1, 3: 1, 4: 1}), ("increasing", {1: 1, 2: 2, 3: 3, 4: 4})):
        expected = sum(w[l] * per_layer[l] for l in w) / sum(w.values())
        got = _loss(tiny_model, ids, labels, [1, 2, 3], scheme)
        assert torch.allclose(got.loss, expected, atol=1e-5), scheme
        for l in w:
            assert torch.allclose(got.per_layer[l], per_layer[l], atol=1e-5)
    custom = _loss(tiny_model, ids, labels, [2], [3.0, 1.0]).loss
    assert torch.allclose(custom, (3 * per_layer[2] + per_layer[4]) / 4, atol=1e-5)


def test_gradients_reach_layers_below_every_exit(tiny_model):
    ids, labels = _batch()
    tiny_model.train()
    # Only exit 1 is trained, final excluded: layers above 1 must get no gradient, layer 1 must.
    weights = {1: 1.0}
    parts = decoder_parts(tiny_model)
    hidden = collect_hidden_states(tiny_model, ids, [1])
    lite_loss(hidden, labels, parts.norm, parts.head, weights, chunk_size=4).loss.backward()
    assert parts.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
    assert parts.embed.weight.grad.abs().sum() > 0
    assert parts.layers[1].mlp.down_proj.weight.grad is None
    tiny_model.zero_grad(set_to_none=True)
    _loss(tiny_model, ids, labels, [1, 2, 3]).loss.backward()
    for i, layer in enumerate(parts.layers):
        assert layer.self_attn.q_proj.weight.grad.abs().sum() > 0, f"layer {i + 1} got no gradient"
    assert parts.norm.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("distill", [0.0, 0.5])
def test_chunked_matches_unchunked(distill):
    from layerexit.models.tiny import build_tiny_llama

    ids, labels = _batch()
    grads = []
    losses = []
    for chunk in (None, 3):
        model = build_tiny_llama(num_layers=4)
        model.train()
        loss = _loss(model, ids, labels, [1, 2, 3], chunk=chunk, distill=distill).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(losses[0], losses[1], atol=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_distill_term_is_zero_only_when_exit_matches_final(tiny_model):
    ids, labels = _batch()
    with_kl = _loss(tiny_model, ids, labels, [2], distill=1.0)
    assert with_kl.distill[2] > 0
    without = _loss(tiny_model, ids, labels, [2])
    assert torch.allclose(with_kl.loss, without.loss + with_kl.distill[2], atol=1e-5)


def test_bad_weights_and_layers_are_config_errors():
    with pytest.raises(ConfigError, match="outside"):
        exit_weights([0, 8], 30)
    with pytest.raises(ConfigError, match="outside"):
        exit_weights([30], 30)
    with pytest.raises(ConfigError, match="3 weights"):
        exit_weights([8, 12], 30, [1.0, 1.0])
    with pytest.raises(ConfigError, match="unknown weight scheme"):
        exit_weights([8], 30, "linear")
