"""Exits exported as plain draft checkpoints, and decoder-layer exit adapters (tiny models, seconds)."""

from __future__ import annotations

import json

import pytest
import torch

from layerexit.errors import ConfigError
from layerexit.models.adapters import (build_adapters, build_decoder_adapters, load_adapters, save_adapters,
                                       base_fingerprint)
from layerexit.evaluation.draft_agreement import measure_agreement
from layerexit.models.draft_export import DRAFT_META, export_draft, read_draft_meta
from layerexit.models.exits import attach_exit_adapters, decoder_parts, early_exit_logits


def _tiny(num_layers=6, tie=True):
    from layerexit.models.tiny import build_tiny_llama, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    model = build_tiny_llama(num_layers=num_layers, vocab_size=len(tok), tie_word_embeddings=tie)
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


def _trained_like(adapter, seed=1):
    """Give an identity-initialised adapter non-zero output projections, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter.layers:
            for w in (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight):
                w.copy_(torch.randn(w.shape, generator=g) * 0.05)


def test_exported_draft_loads_in_transformers_and_matches_exit_logits(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = _tiny(tie=True)
    info = export_draft(model, tok, 3, tmp_path / "draft")
    draft = AutoModelForCausalLM.from_pretrained(tmp_path / "draft").eval()
    assert draft.config.num_hidden_layers == 3 == info.num_layers
    assert len(decoder_parts(draft).layers) == 3
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog.")["input_ids"]])
    with torch.no_grad():
        want = early_exit_logits(model, ids, 3)
        got = draft(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert AutoTokenizer.from_pretrained(tmp_path / "draft").get_vocab() == tok.get_vocab()
    meta = read_draft_meta(tmp_path / "draft")
    assert meta["layer"] == 3 and meta["fingerprint"] == base_fingerprint(model, tok)


def test_untied_head_is_exported(tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = _tiny(tie=False)
    export_draft(model, tok, 2, tmp_path / "d")
    draft = AutoModelForCausalLM.from_pretrained(tmp_path / "d").eval()
    torch.testing.assert_close(draft.lm_head.weight, model.lm_head.weight)
    assert not torch.equal(draft.lm_head.weight, draft.model.embed_tokens.weight)


def test_draft_with_decoder_layer_adapter_equals_exit_with_adapter(tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = _tiny()
    adapters = build_decoder_adapters(model, [2], num_layers=2, init="zero_residual")
    _trained_like(adapters[2])
    attach_exit_adapters(model, adapters)
    ids = torch.tensor([tok("Write a short poem about the sea and the sky.")["input_ids"]])
    with torch.no_grad():
        want = early_exit_logits(model, ids, 2)
        plain = early_exit_logits(model, ids, 1)  # a layer without adapter still works
    info = export_draft(model, tok, 2, tmp_path / "d")
    assert info.adapter == "decoder_layer" and info.num_layers == 4
    draft = AutoModelForCausalLM.from_pretrained(tmp_path / "d").eval()
    with torch.no_grad():
        got = draft(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert plain.shape == want.shape


def test_decoder_adapter_zero_residual_is_identity_and_final_layer_is_untouched():
    model, tok = _tiny()
    ids = torch.tensor([tok("Two plus two equals four.")["input_ids"]])
    with torch.no_grad():
        before_final = model(ids).logits.clone()
        before_exit = early_exit_logits(model, ids, 3)
    adapters = build_decoder_adapters(model, [3], 1, "zero_residual")
    attach_exit_adapters(model, adapters)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before_final)  # bit for bit
        torch.testing.assert_close(early_exit_logits(model, ids, 3), before_exit)
        _trained_like(adapters[3])
        assert not torch.allclose(early_exit_logits(model, ids, 3), before_exit)
        assert torch.equal(model(ids).logits, before_final)


def test_next_layers_init_copies_the_following_layer():
    model, tok = _tiny()
    adapters = build_decoder_adapters(model, [2], 1, "next_layers")
    ids = torch.tensor([tok("Explain why the sky is blue.")["input_ids"]])
    with torch.no_grad():
        # exit 2 through a copy of layer 3 == the model's own layer-3 output
        torch.testing.assert_close(adapters[2](_hidden(model, ids, 2)), _hidden(model, ids, 3))


def _hidden(model, ids, layer):
    from layerexit.models.exits import forward_to_layer

    return forward_to_layer(model, ids, layer)


def test_decoder_adapter_kv_cache_equals_recomputing_the_prefix():
    from layerexit.engine.cache import ExitKVCache

    model, tok = _tiny()
    adapters = build_decoder_adapters(model, [2], 2, "zero_residual")
    a = adapters[2]
    _trained_like(a)
    parts = decoder_parts(model)
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog.")["input_ids"]])
    T = ids.shape[1]
    with torch.no_grad():
        h = _hidden(model, ids, 2)
        full = a(h)
        cfg = model.config
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        L = parts.num_layers
        cache = ExitKVCache(L + a.num_layers, 1, T, cfg.num_key_value_heads, head_dim, torch.float32)
        a.set_cache_base(L)
        outs = []
        for t in range(T):  # one position at a time, attending through the cache
            pos = torch.tensor([[t]])
            rope = parts.rotary(h[:, t : t + 1], position_ids=pos)
            outs.append(a.step(h[:, t : t + 1], None, pos, rope, cache))
        inc = torch.cat(outs, dim=1)
    torch.testing.assert_close(inc, full, rtol=1e-5, atol=1e-5)
    assert cache.lengths[L:] == [T, T] and cache.lengths[:L] == [0] * L


def test_decoder_adapters_save_and_load_round_trip(tmp_path):
    model, tok = _tiny()
    adapters = build_decoder_adapters(model, [2, 4], 1, "next_layers")
    _trained_like(adapters[2])
    save_adapters(adapters, tmp_path / "ad", base_fingerprint(model, tok))
    meta = json.loads((tmp_path / "ad" / "adapters.json").read_text())
    assert meta["kind"] == "decoder_layer" and meta["adapter_layers"] == 1 and meta["layers"] == [2, 4]
    loaded = load_adapters(tmp_path / "ad", model, tok)
    for l in (2, 4):
        for (k, v), (k2, v2) in zip(adapters[l].state_dict().items(), loaded[l].state_dict().items()):
            assert k == k2 and torch.equal(v, v2)
    with pytest.raises(ConfigError, match="model's own layer class"):
        load_adapters(tmp_path / "ad")
    other, other_tok = _tiny(num_layers=5)
    with pytest.raises(ConfigError, match="another model"):
        load_adapters(tmp_path / "ad", other, other_tok)


def test_export_refuses_bad_layers_and_mlp_adapters(tmp_path):
    model, tok = _tiny()
    with pytest.raises(ConfigError, match="choose a layer in 1..5"):
        export_draft(model, tok, 6, tmp_path / "d")
    with pytest.raises(ConfigError, match="choose a layer in 1..5"):
        export_draft(model, tok, 0, tmp_path / "d")
    attach_exit_adapters(model, build_adapters([3], model.config.hidden_size, 8))
    with pytest.raises(ConfigError, match="not made of standard decoder layers"):
        export_draft(model, tok, 3, tmp_path / "d")
    assert not (tmp_path / "d").exists()
    export_draft(model, tok, 2, tmp_path / "d")  # an exit without adapter still exports
    assert (tmp_path / "d" / DRAFT_META).is_file()
    with pytest.raises(ValueError, match="adapter attends over a sequence"):
        build_decoder_adapters(model, [2], 1)[2](torch.zeros(3, model.config.hidden_size))
    with pytest.raises(ConfigError, match="adapter layers"):
        build_decoder_adapters(model, [4], 3)


def test_measure_agreement_counts_draft_vs_final():
    from layerexit.data.prompts import format_prompt
    from layerexit.engine.decode import EarlyExitEngine
    from layerexit.engine.options import SamplingParams

    model, tok = _tiny()
    prompts = ["Name three colours.", "What is two plus two?"]
    got = measure_agreement(model, tok, 2, prompts, max_new_tokens=8)
    engine = EarlyExitEngine(model, {tok.eos_token_id}, tok.pad_token_id)
    same = total = 0
    for p in prompts:
        ids = format_prompt(tok, p)
        out = engine.generate([ids], sampling=SamplingParams(max_new_tokens=8))[0].token_ids
        seq = torch.tensor([ids + out])
        with torch.no_grad():
            d = early_exit_logits(model, seq, 2)[0, len(ids) - 1 : -1].argmax(-1)
            f = early_exit_logits(model, seq, 6)[0, len(ids) - 1 : -1].argmax(-1)
        same += int((d == f).sum())
        total += len(out)
    assert got == pytest.approx(same / total)


# ----------------------------------------------------------------------------- the engine drafts through the adapter
PROMPTS4 = [[30, 31, 32, 33, 30, 31, 32, 33, 30, 31], [40, 41, 42], [50, 51, 52, 53, 54, 55], [60, 61, 60, 61, 62]]


def _spec_tokens(model, prompts, n=14, **extra):
    from layerexit.engine.decode import EarlyExitEngine
    from layerexit.engine.options import ExitConfig, SamplingParams

    engine = EarlyExitEngine(model, eos_token_ids=set(), pad_token_id=0)
    steps = list(engine.stream(prompts, ExitConfig(policy="self-speculative", **extra),
                               SamplingParams(max_new_tokens=n)))
    got: dict[int, list[int]] = {}
    layers: dict[int, list[int]] = {}
    for step in steps:
        for ev in step:
            got.setdefault(ev.index, []).append(ev.token_id)
            layers.setdefault(ev.index, []).append(ev.exit_layer)
    return [got[i] for i in range(len(prompts))], [layers[i] for i in range(len(prompts))], len(steps)


@pytest.mark.parametrize("prompts", [PROMPTS4[:1], PROMPTS4], ids=["batch1", "batch4"])
def test_a_draft_through_the_models_own_next_layers_is_always_accepted(prompts):
    """Exit 2 of 4 + an adapter copied from layers 3 and 4 *is* the full model: if the adapter's KV cache were wrong
    (missing, misaligned columns, stale after rejections), drafts would be rejected."""
    from layerexit.engine.reference import hf_greedy_generate
    from layerexit.models.tiny import build_tiny_llama

    model = build_tiny_llama(num_layers=4)
    ref = hf_greedy_generate(model, prompts, 14, pad_id=0, eos=set())
    attach_exit_adapters(model, build_decoder_adapters(model, [2], 2, "next_layers"))
    toks, layers, steps = _spec_tokens(model, prompts, layer=2, num_draft=4)
    assert toks == ref
    drafted = sum(l == 2 for row in layers for l in row)
    assert drafted >= 0.7 * sum(len(r) for r in ref), layers  # accepted: every full draft of 4 (the rest: budget)
    assert steps <= 5


@pytest.mark.parametrize("extra", [dict(num_draft=3), dict(num_draft=5, draft_stop=0.02),
                                   dict(draft="layer+ngram", num_draft=4), dict(num_draft=3, draft_vocab=True)])
@pytest.mark.parametrize("prompts", [PROMPTS4[:1], PROMPTS4], ids=["batch1", "batch4"])
def test_self_speculative_with_a_decoder_layer_adapter_equals_final(prompts, extra, tmp_path):
    from layerexit.engine.heads import save_draft_vocab
    from layerexit.engine.reference import hf_greedy_generate
    from layerexit.models.tiny import build_tiny_llama, build_tiny_tokenizer

    if extra.get("draft_vocab"):  # the draft scores 200 of the 512 tokens; verification keeps the full head
        extra = {**extra, "draft_vocab": str(save_draft_vocab(tmp_path / "dv.json", list(range(0, 400, 2)),
                                                              build_tiny_tokenizer()))}
    model = build_tiny_llama(num_layers=4)
    ref = hf_greedy_generate(model, prompts, 14, pad_id=0, eos=set())
    adapters = build_decoder_adapters(model, [1], 1, "zero_residual")
    _trained_like(adapters[1])
    attach_exit_adapters(model, adapters)
    toks, _, _ = _spec_tokens(model, prompts, layer=1, **extra)
    assert toks == ref


def test_per_token_policies_refuse_decoder_layer_adapters_at_their_exits():
    from layerexit.engine.decode import EarlyExitEngine
    from layerexit.engine.options import ExitConfig, SamplingParams
    from layerexit.models.tiny import build_tiny_llama

    model = build_tiny_llama(num_layers=4)
    attach_exit_adapters(model, build_decoder_adapters(model, [2], 1))
    engine = EarlyExitEngine(model, eos_token_ids=set(), pad_token_id=0)
    with pytest.raises(ConfigError, match="serve as drafts"):
        engine.generate([[5, 6, 7]], ExitConfig(policy="fixed", layer=2), SamplingParams(max_new_tokens=2))
    out = engine.generate([[5, 6, 7]], ExitConfig(policy="final"), SamplingParams(max_new_tokens=2))
    assert len(out[0].token_ids) == 2


def test_a_model_carries_its_draft_settings_and_requests_override_them(tmp_path):
    import shutil

    from layerexit.engine.decode import EarlyExitEngine
    from layerexit.engine.heads import save_draft_vocab
    from layerexit.engine.options import ExitConfig, SamplingParams
    from layerexit.models.draft_settings import VOCAB_FILE, write_draft_settings
    from layerexit.models.loading import load_model_and_tokenizer
    from layerexit.models.tiny import save_tiny_checkpoint

    d = save_tiny_checkpoint(tmp_path / "m", num_layers=4)
    model, tok = load_model_and_tokenizer(str(d))
    save_draft_vocab(d / VOCAB_FILE, list(range(3, 200)), tok)
    write_draft_settings(d, {"layer": 3, "num_draft": 2, "draft_stop": None, "draft_vocab": VOCAB_FILE})
    model, tok = load_model_and_tokenizer(str(d))
    engine = EarlyExitEngine(model, set(), tok.pad_token_id)
    prompt = [tok("The quick brown fox")["input_ids"]]
    ref = engine.generate(prompt, ExitConfig(), SamplingParams(max_new_tokens=10))[0].token_ids
    shipped = engine.generate(prompt, ExitConfig(policy="self-speculative"), SamplingParams(max_new_tokens=10))[0]
    assert shipped.token_ids == ref
    assert set(shipped.exit_layers) <= {3, 4} and 3 in shipped.exit_layers  # drafted at the shipped layer
    asked = engine.generate(prompt, ExitConfig(policy="self-speculative", layer=1),
                            SamplingParams(max_new_tokens=10))[0]
    assert asked.token_ids == ref and set(asked.exit_layers) <= {1, 4}
    (d / VOCAB_FILE).unlink()
    with pytest.raises(ConfigError, match="draft_vocab"):
        load_model_and_tokenizer(str(d))
    shutil.rmtree(d)


def test_measured_acceptance_and_the_cost_model():
    from layerexit.engine.decode import EarlyExitEngine
    from layerexit.models.tiny import build_tiny_llama
    from layerexit.tuning.draft_choice import (choose_draft, draft_cost_ratio, expected_tokens, measure_acceptance,
                                               predicted_speedup)

    model = build_tiny_llama(num_layers=4)
    attach_exit_adapters(model, build_decoder_adapters(model, [2], 2, "next_layers"))  # == the full model
    engine = EarlyExitEngine(model, set(), 0)
    perfect = measure_acceptance(engine, PROMPTS4, 2, 3, max_new_tokens=13)
    assert perfect.per_position == [1.0, 1.0, 1.0] and perfect.acceptance == 1.0
    assert perfect.tokens_per_verification == pytest.approx(4.0)
    noisy = measure_acceptance(engine, PROMPTS4, 1, 3, max_new_tokens=13)  # exit 1 has no adapter
    assert noisy.accepted < noisy.drafted
    # layer 2 + 2 adapter layers read the bytes of 4 layers, plus the head: the whole model
    assert draft_cost_ratio(model, 2) == pytest.approx(1.0)
    assert draft_cost_ratio(model, 1) < draft_cost_ratio(model, 1, None) + 1e-9 < 1.0
    assert draft_cost_ratio(model, 1, 64) < draft_cost_ratio(model, 1)
    assert expected_tokens([0.5, 0.5], 2) == pytest.approx(1.75)
    assert predicted_speedup([0.79] * 4, 0.3, 1) == pytest.approx(1.79 / 1.3)
    best, rows = choose_draft(model, engine, PROMPTS4, [1, 2], max_draft=3, max_new_tokens=13)
    assert [r.layer for r in rows] == [1, 2] and best.predicted_speedup == max(r.predicted_speedup for r in rows)


def test_exported_draft_runs_as_transformers_assistant_model(tmp_path):
    """transformers' assisted generation takes the exported draft unchanged, and stays lossless (greedy)."""
    from transformers import AutoModelForCausalLM

    model, tok = _tiny()
    model.generation_config.pad_token_id = tok.pad_token_id
    adapters = build_decoder_adapters(model, [3], 1, "zero_residual")
    _trained_like(adapters[3])
    attach_exit_adapters(model, adapters)
    export_draft(model, tok, 3, tmp_path / "d")
    draft = AutoModelForCausalLM.from_pretrained(tmp_path / "d").eval()
    ids = torch.tensor([tok("Write a short poem about the sea.")["input_ids"]])
    with torch.no_grad():
        plain = model.generate(ids, max_new_tokens=12, do_sample=False)
        assisted = model.generate(ids, max_new_tokens=12, do_sample=False, assistant_model=draft)
    assert torch.equal(plain, assisted)


def test_cost_model_prices_layerskip_llama2_7b():
    """LayerSkip's Llama2-7B operating point (exit 8 of 32, acceptance 0.79) under the weight-bytes cost model."""
    from layerexit.tuning.draft_choice import predicted_speedup

    layer = 4096 * 4096 * 4 + 3 * 4096 * 11008  # one LLaMA-2-7B decoder layer's weights
    head = 32000 * 4096
    c = (8 * layer + head) / (32 * layer + head)
    assert predicted_speedup([0.79] * 1, c, 1) == pytest.approx(1.42, abs=0.01)
    assert predicted_speedup([0.79] * 3, c, 3) == pytest.approx(1.62, abs=0.01)


def test_llama_shape_cost_ratio_matches_the_weight_arithmetic_and_counters_give_the_same_speedup():
    from layerexit.tuning.draft_choice import llama_shape_cost_ratio, predicted_speedup, speedup_from_counters

    layer = 4096 * 4096 * 4 + 3 * 4096 * 11008
    head = 32000 * 4096
    assert llama_shape_cost_ratio(8) == pytest.approx((8 * layer + head) / (32 * layer + head))
    assert llama_shape_cost_ratio(8, adapter_layers=1) == pytest.approx((9 * layer + head) / (32 * layer + head))
    c = llama_shape_cost_ratio(8)
    # 1000 verifications of k = 1 at acceptance 0.79 accept 790 tokens: the same 1.42x as the per-position form
    assert speedup_from_counters(790, 1000, 1, c) == pytest.approx(predicted_speedup([0.79], c, 1))
    assert speedup_from_counters(0, 0, 3, c) == pytest.approx(1 / (3 * c + 1))
