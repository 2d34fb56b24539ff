"""Exit points over a stock HF model: exact at the last layer, equal to norm+head of transformers' hidden
states elsewhere, and nothing above the exit layer is computed."""

from __future__ import annotations

import pytest
import torch

from layerexit.errors import ConfigError, ModelSpecError
from layerexit.models.exits import (
    check_layers,
    decoder_parts,
    early_exit_logits,
    exit_logits,
    forward_to_layer,
)


def test_exit_at_last_layer_reproduces_model_logits(tiny_model):
    ids = torch.randint(3, 512, (2, 9))
    with torch.no_grad():
        ours = early_exit_logits(tiny_model, ids, 4)
        theirs = tiny_model(ids).logits
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_exit_at_layer_equals_norm_head_of_hf_hidden_states(tiny_model, layer):
    ids = torch.randint(3, 512, (2, 9))
    with torch.no_grad():
        hs = tiny_model(ids, output_hidden_states=True).hidden_states
        parts = decoder_parts(tiny_model)
        expected = parts.head(parts.norm(hs[layer]))
        got = early_exit_logits(tiny_model, ids, layer)
    assert torch.allclose(got, expected, atol=1e-6)
    assert got.shape == (2, 9, 512)


def test_layers_above_exit_are_not_run(tiny_model):
    calls = []
    parts = decoder_parts(tiny_model)
    handles = [l.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, l in enumerate(parts.layers)]
    forward_to_layer(tiny_model, torch.randint(3, 512, (1, 5)), 2)
    for h in handles:
        h.remove()
    assert calls == [0, 1]


def test_left_padding_with_mask_matches_unpadded(tiny_model):
    ids = torch.randint(3, 512, (1, 6))
    padded = torch.cat([torch.zeros((1, 3), dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros((1, 3), dtype=torch.long), torch.ones((1, 6), dtype=torch.long)], dim=1)
    with torch.no_grad():
        a = early_exit_logits(tiny_model, ids, 3)
        b = early_exit_logits(tiny_model, padded, 3, attention_mask=mask)[:, 3:]
    assert torch.allclose(a, b, atol=1e-5)


def test_bad_layers_and_layouts_are_clear_errors(tiny_model):
    parts = decoder_parts(tiny_model)
    with pytest.raises(ConfigError, match=r"1\.\.4"):
        check_layers(parts, [5])
    with pytest.raises(ConfigError):
        forward_to_layer(tiny_model, torch.ones((1, 2), dtype=torch.long), 0)
    with pytest.raises(ModelSpecError, match="LLaMA-family"):
        decoder_parts(torch.nn.Linear(2, 2))
    assert exit_logits(parts, torch.zeros(3, 64)).shape == (3, 512)
