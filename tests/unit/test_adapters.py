"""Exit adapters: identity at start, the final layer stays the base model's bit for bit, the artifact round-trips
with its fingerprint, and loading a model directory attaches them for every exit path."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from layerexit.errors import ConfigError
from layerexit.models.adapters import (
    ADAPTERS_DIR, ExitAdapter, base_fingerprint, build_adapters, load_adapters, save_adapters,
)
from layerexit.models.exits import attach_exit_adapters, collect_hidden_states, decoder_parts, exit_logits


def _trained(adapters, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in adapters.values():
            for p in a.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return adapters


def test_fresh_adapter_is_identity_and_counts_flops():
    a = ExitAdapter(16, 4)
    h = torch.randn(3, 5, 16)
    assert torch.equal(a(h), h)
    assert a.flops(10) == 2 * 10 * (16 * 4 + 4 * 16)


def test_final_layer_is_bit_identical_with_adapters(tiny_model_and_tokenizer):
    model, _ = tiny_model_and_tokenizer
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
        attach_exit_adapters(model, _trained(build_adapters([1, 2, 3], model.config.hidden_size, 8)))
        try:
            after = model(ids).logits
            parts = decoder_parts(model)
            L = parts.num_layers
            hidden = collect_hidden_states(model, ids, [2, L])
            final = exit_logits(parts, hidden[L], L)
            exit2 = exit_logits(parts, hidden[2], 2)
            plain2 = parts.head(parts.norm(hidden[2]))
        finally:
            attach_exit_adapters(model, {})
    assert torch.equal(before, after)
    assert torch.equal(final, before)
    assert not torch.allclose(exit2, plain2)  # the exit does go through its adapter
    assert not any(k.startswith("_layerexit") or "adapter" in k for k in model.state_dict())


def test_round_trip_and_fingerprint(tiny_model_and_tokenizer, tmp_path):
    model, tok = tiny_model_and_tokenizer
    adapters = _trained(build_adapters([1, 3], model.config.hidden_size, 8))
    fp = base_fingerprint(model, tok)
    save_adapters(adapters, tmp_path / ADAPTERS_DIR, fp)
    loaded = load_adapters(tmp_path / ADAPTERS_DIR, model, tok)
    h = torch.randn(4, model.config.hidden_size)
    with torch.no_grad():
        for l in (1, 3):
            assert torch.equal(loaded[l](h), adapters[l](h))
    other = AutoModelForCausalLM.from_config(model.config)  # same shapes, other weights
    with pytest.raises(ConfigError, match="another model"):
        load_adapters(tmp_path / ADAPTERS_DIR, other, tok)


def test_half_written_adapter_dir_is_an_error(tmp_path):
    (tmp_path / "exit_adapters").mkdir()
    (tmp_path / "exit_adapters" / "adapters.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a complete"):
        load_adapters(tmp_path / "exit_adapters")


def test_loading_a_model_dir_attaches_shipped_adapters(tiny_dir, tmp_path):
    from layerexit.models.loading import load_model_and_tokenizer

    plain, tok = load_model_and_tokenizer(str(tiny_dir))
    assert decoder_parts(plain).adapters == {}
    model_dir = tmp_path / "with_adapters"
    shutil.copytree(tiny_dir, model_dir)
    adapters = _trained(build_adapters([2], plain.config.hidden_size, 4))
    save_adapters(adapters, model_dir / ADAPTERS_DIR, base_fingerprint(plain, tok))
    model, _ = load_model_and_tokenizer(str(model_dir))
    parts = decoder_parts(model)
    assert sorted(parts.adapters) == [2]
    h = torch.randn(3, plain.config.hidden_size)
    with torch.no_grad():
        assert torch.equal(parts.adapters[2](h), adapters[2](h))
    # The base checkpoint still loads in plain transformers (the adapters are a separate directory).
    AutoModelForCausalLM.from_pretrained(model_dir)


def test_traces_and_alignment_use_the_adapters(tiny_model_and_tokenizer):
    from layerexit.engine.traces import layer_predictions

    model, _ = tiny_model_and_tokenizer
    seq = torch.randint(0, model.config.vocab_size, (12,)).tolist()
    _, conf_plain, _ = layer_predictions(model, seq, 4)
    attach_exit_adapters(model, _trained(build_adapters([2], model.config.hidden_size, 8), seed=3))
    try:
        _, conf_adapted, _ = layer_predictions(model, seq, 4)
    finally:
        attach_exit_adapters(model, {})
    L = decoder_parts(model).num_layers
    assert not torch.allclose(conf_plain[1], conf_adapted[1])  # layer 2 goes through its adapter
    assert torch.equal(conf_plain[L - 1], conf_adapted[L - 1])  # the final layer does not change
