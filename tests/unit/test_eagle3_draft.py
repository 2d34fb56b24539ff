"""EAGLE-3 draft module: training-time test equals decode-time chaining, the vocabulary map, the vLLM layout."""

from __future__ import annotations

import json

import pytest
import torch

from layerexit.errors import ConfigError
from layerexit.models.eagle3 import Eagle3Draft, Eagle3Spec, check_target, is_eagle3_dir, load_eagle3, save_eagle3


@pytest.fixture()
def draft(tiny_model) -> Eagle3Draft:
    torch.manual_seed(0)
    cfg = tiny_model.config
    spec = Eagle3Spec.for_target(cfg, aux_layers=(1, 2, 3), draft_vocab_size=cfg.vocab_size // 2)
    d = Eagle3Draft(spec, tiny_model.get_input_embeddings())
    for p in d.parameters():  # the output projection starts random so every part of the layer matters
        torch.nn.init.normal_(p, std=0.2) if p.dim() > 1 else None
    d.set_vocab(torch.randperm(cfg.vocab_size)[: spec.draft_vocab_size])
    return d.eval()


def test_training_time_test_equals_decode_time_chaining(draft) -> None:
    """Step j of `unrolled` at start i is what a decode-time chain computes from a cache of the prefix."""
    torch.manual_seed(1)
    b, t, h, steps = 2, 7, draft.spec.hidden_size, 3
    ids = torch.randint(0, draft.spec.vocab_size, (b, t))
    embeds = draft.embed(ids)
    fused = torch.randn(b, t, h)
    positions = torch.arange(1, t + 1).expand(b, t)
    with torch.no_grad():
        trained = draft.unrolled(embeds, fused, positions, steps)
        prefix = draft(embeds, fused, positions)  # step 0 over all positions: the decode-time prefix cache
        assert torch.allclose(prefix.logits, trained[0], atol=1e-5)
        for i in range(t - steps + 1):
            past = (prefix.keys[:, :, : i + 1], prefix.values[:, :, : i + 1])
            hidden = prefix.hidden[:, i: i + 1]
            for j in range(1, steps):
                out = draft(embeds[:, i + j: i + j + 1], hidden, positions[:, i: i + 1] + j, past=past)
                assert torch.allclose(out.logits[:, 0], trained[j][:, i], atol=1e-4), (i, j)
                past = (torch.cat([past[0], out.keys], 2), torch.cat([past[1], out.values], 2))
                hidden = out.hidden


def test_vocabulary_map_round_trips_and_refuses_bad_ids(draft) -> None:
    d2t = draft.draft_to_target
    assert torch.equal(draft.t2d.nonzero().squeeze(1), d2t)  # t2d marks exactly the draft's target ids
    table = draft.target_to_draft()
    assert torch.equal(table[d2t], torch.arange(draft.spec.draft_vocab_size))
    assert (table[~draft.t2d] == -1).all()
    with pytest.raises(ConfigError, match="draft.vocab_size"):
        draft.set_vocab(list(range(3)))
    with pytest.raises(ConfigError, match="distinct target ids"):
        draft.set_vocab([draft.spec.vocab_size + 5] + list(range(draft.spec.draft_vocab_size - 1)))


def test_bad_settings_name_the_field(tiny_model) -> None:
    cfg = tiny_model.config
    with pytest.raises(ConfigError, match=r"draft.aux_layers \[9\] out of range"):
        Eagle3Spec.for_target(cfg, aux_layers=(1, 9))
    with pytest.raises(ConfigError, match="draft.vocab_size .* larger than the model's vocabulary"):
        Eagle3Spec.for_target(cfg, draft_vocab_size=cfg.vocab_size + 1)
    spec = Eagle3Spec.for_target(cfg, aux_layers=(1, 2, 3))
    other = type(cfg)(**{**cfg.to_dict(), "num_hidden_layers": cfg.num_hidden_layers + 2})
    with pytest.raises(ConfigError, match="trained for another model .*num_hidden_layers"):
        check_target(spec, other)
    check_target(spec, cfg)


def test_saved_in_vllm_layout_and_loads_back(draft, tmp_path) -> None:
    out = save_eagle3(draft, tmp_path / "d", dtype=torch.float32)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and is_eagle3_dir(out)
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    assert config["draft_vocab_size"] == draft.spec.draft_vocab_size
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("d2t").dtype == torch.int64 and f.get_tensor("t2d").dtype == torch.bool
    assert {"fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d", "midlayer.hidden_norm.weight",
            "midlayer.self_attn.q_proj.weight", "midlayer.mlp.gate_proj.weight"} <= names
    assert not any("embed_tokens" in n for n in names), "the target's embedding is shared, not saved"
    back = load_eagle3(out, draft._embed[0])
    for (n, a), (_, b) in zip(draft.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n
