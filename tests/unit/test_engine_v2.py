"""Engine v2 on a tiny LLaMA: per-token logprobs, candidate-set checks, batched lossless self-speculative
decoding (layer / n-gram / both / dynamic length), compaction under continuous joins, draft vocabularies."""

from __future__ import annotations

import pytest
import torch

from layerexit.engine.decode import EarlyExitEngine, SequenceResult
from layerexit.engine.options import ExitConfig, SamplingParams
from layerexit.engine.reference import hf_greedy_generate
from layerexit.errors import ConfigError
from layerexit.models.exits import early_exit_logits

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
# Prompts that repeat themselves, so the n-gram drafter finds matches; plus one that does not.
REPEATING = [[30, 31, 32, 33, 30, 31, 32, 33, 30, 31], [40, 41, 42, 40, 41, 42, 40], [50, 51, 52, 53, 54, 55],
             [60, 61, 60, 61, 60, 61, 60, 61]]


def _engine(model, eos=()):
    return EarlyExitEngine(model, eos_token_ids=set(eos), pad_token_id=0)


@pytest.mark.parametrize("cfg", [ExitConfig(policy="final"), ExitConfig(policy="fixed", layer=2),
                                 ExitConfig(policy="confidence", thresholds={1: 0.03, 2: 0.03, 3: 0.03},
                                            check_vocab=7)])
def test_logprobs_are_log_softmax_of_the_exit_layer(tiny_model, cfg):
    out = _engine(tiny_model).generate(PROMPTS, cfg, SamplingParams(max_new_tokens=6, logprobs=3))
    for prompt, r in zip(PROMPTS, out):
        assert len(r.logprobs) == len(r.token_ids) == len(r.top_logprobs)
        ids = torch.tensor([prompt + r.token_ids[:-1]])
        for i, (tok, layer) in enumerate(zip(r.token_ids, r.exit_layers)):
            logp = torch.log_softmax(early_exit_logits(tiny_model, ids, layer)[0, len(prompt) - 1 + i].detach().float(), -1)
            assert r.logprobs[i] == pytest.approx(float(logp[tok]), abs=1e-4)
            top = logp.topk(3)
            assert [t for t, _ in r.top_logprobs[i]] == top.indices.tolist()
            assert [v for _, v in r.top_logprobs[i]] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_logprobs_off_costs_nothing_and_zero_means_chosen_only(tiny_model):
    off = _engine(tiny_model).generate(PROMPTS, ExitConfig(), SamplingParams(max_new_tokens=3))
    assert all(r.logprobs == [] for r in off)
    zero = _engine(tiny_model).generate(PROMPTS, ExitConfig(), SamplingParams(max_new_tokens=3, logprobs=0))
    assert all(len(r.logprobs) == 3 and r.top_logprobs == [[], [], []] for r in zero)
    with pytest.raises(ConfigError, match="logprobs"):
        _engine(tiny_model).generate(PROMPTS, ExitConfig(), SamplingParams(logprobs=21))


def test_self_speculative_logprobs_come_from_the_final_layer(tiny_model):
    cfg = ExitConfig(policy="self-speculative", layer=2, num_draft=3)
    spec = _engine(tiny_model).generate(PROMPTS, cfg, SamplingParams(max_new_tokens=8, logprobs=2))
    final = _engine(tiny_model).generate(PROMPTS, ExitConfig(), SamplingParams(max_new_tokens=8, logprobs=2))
    for a, b in zip(spec, final):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_candidate_set_with_k_equal_vocab_matches_full(tiny_model):
    V = tiny_model.config.vocab_size
    base = dict(policy="confidence", thresholds={1: 0.02, 2: 0.025, 3: 0.03})
    full = _engine(tiny_model).generate(PROMPTS, ExitConfig(**base), SamplingParams(max_new_tokens=10))
    cand = _engine(tiny_model).generate(PROMPTS, ExitConfig(**base, check_vocab=V), SamplingParams(max_new_tokens=10))
    assert [r.token_ids for r in cand] == [r.token_ids for r in full]
    assert [r.exit_layers for r in cand] == [r.exit_layers for r in full]
    assert len({l for r in full for l in r.exit_layers}) > 1, "thresholds should make rows exit at several layers"
    small = _engine(tiny_model).generate(PROMPTS, ExitConfig(**base, check_vocab=4), SamplingParams(max_new_tokens=10))
    assert sum(r.flops for r in small) < sum(r.flops for r in full)  # later checks score 4 rows, not V


@pytest.mark.parametrize("bad", [0, -3, 10**6])
def test_candidate_set_size_is_checked(tiny_model, bad):
    with pytest.raises((ConfigError, ValueError), match="check_vocab"):
        _engine(tiny_model).generate(PROMPTS, ExitConfig(policy="confidence", check_vocab=bad))


def test_candidate_set_flops_match_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from layerexit.models.tiny import build_tiny_llama

    model = build_tiny_llama(num_layers=4)
    model.config._attn_implementation = "eager"  # CPU SDPA kernels are invisible to FlopCounterMode
    cfg = ExitConfig(policy="confidence", thresholds={1: 0.025, 2: 0.025, 3: 0.025}, check_vocab=6)
    with FlopCounterMode(display=False) as counter:
        out = _engine(model).generate(PROMPTS, cfg, SamplingParams(max_new_tokens=7, logprobs=1))
    ours = sum(r.flops + r.prefill_flops for r in out)
    measured = counter.get_total_flops()
    assert abs(ours - measured) / measured < 0.01, (ours, measured)


@pytest.mark.parametrize("extra", [
    dict(draft="layer", layer=2, num_draft=3),
    dict(draft="ngram", num_draft=5),
    dict(draft="layer+ngram", layer=2, num_draft=4),
    dict(draft="layer", layer=3, num_draft=6, draft_stop=0.05),
    dict(draft="layer+ngram", layer=1, num_draft=6, draft_stop=0.04),
])
def test_batched_self_speculative_equals_final(tiny_model, extra):
    ref = hf_greedy_generate(tiny_model, REPEATING, 16, pad_id=0, eos=set())
    engine = _engine(tiny_model)
    steps = list(engine.stream(REPEATING, ExitConfig(policy="self-speculative", **extra),
                               SamplingParams(max_new_tokens=16)))
    got: dict[int, list[int]] = {}
    for step in steps:
        for ev in step:
            got.setdefault(ev.index, []).append(ev.token_id)
    assert [got[i] for i in range(len(REPEATING))] == ref
    if "ngram" in extra["draft"]:
        assert len(steps) < 16, "some step should have accepted an n-gram draft"


def test_self_speculative_flops_match_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from layerexit.models.tiny import build_tiny_llama

    model = build_tiny_llama(num_layers=4)
    model.config._attn_implementation = "eager"
    for extra in (dict(draft="ngram", num_draft=4), dict(draft="layer+ngram", layer=2, draft_stop=0.05)):
        cfg = ExitConfig(policy="self-speculative", **extra)
        with FlopCounterMode(display=False) as counter:
            out = _engine(model).generate(REPEATING, cfg, SamplingParams(max_new_tokens=9))
        ours = sum(r.flops + r.prefill_flops for r in out)
        measured = counter.get_total_flops()
        assert abs(ours - measured) / measured < 0.01, (extra, ours, measured)


class _EveryStepJoiner:
    """Offers one new short prompt at every step for ``steps`` steps (a server under steady load)."""

    def __init__(self, steps, max_new=4):
        self.steps, self.max_new, self.calls = steps, max_new, 0

    def admit(self, max_prompt_len, rows):
        self.calls += 1
        if self.calls > self.steps:
            return []
        return [([7 + self.calls % 50, 8, 9], SamplingParams(max_new_tokens=self.max_new))]

    def cancelled(self, index):
        return False


@pytest.mark.parametrize("cfg", [ExitConfig(policy="final", kv="recompute"),
                                 ExitConfig(policy="fixed", layer=2, kv="propagate"),
                                 ExitConfig(policy="self-speculative", layer=2, draft="layer+ngram", num_draft=3)])
def test_a_batch_that_keeps_admitting_joiners_stays_narrow(tiny_model, cfg):
    """Continuous batching for 150 steps: finished rows' columns are dropped, so the cache width stays bounded
    by the live rows' lengths instead of growing with every step; and joined rows still decode exactly."""
    engine = _engine(tiny_model)
    engine.keep_last_cache = True
    joiner = _EveryStepJoiner(150)
    results = [SequenceResult()]
    widths = []
    by_index: dict[int, list[int]] = {}
    for step in engine.stream([[3, 4, 5]], cfg, SamplingParams(max_new_tokens=4), results=results, joiner=joiner):
        widths.append(engine.last_cache.keys[0].shape[2])
        for ev in step:
            by_index.setdefault(ev.index, []).append(ev.token_id)
    assert joiner.calls >= 150
    assert max(widths) <= 80, max(widths)
    if cfg.policy in ("final", "self-speculative"):
        for i in (5, 77, 140):
            prompt = [7 + (i) % 50, 8, 9]
            assert by_index[i] == hf_greedy_generate(tiny_model, [prompt], 4, pad_id=0, eos=set())[0]


def test_the_engine_keeps_no_finished_batch(tiny_model):
    engine = _engine(tiny_model)
    engine.generate(PROMPTS, ExitConfig(), SamplingParams(max_new_tokens=3))
    assert engine.last_cache is None


def test_draft_vocabulary_file_round_trip_and_foreign_tokenizer(tiny_model_and_tokenizer, tmp_path):
    from layerexit.engine.heads import build_draft_vocab, load_draft_vocab, save_draft_vocab

    model, tok = tiny_model_and_tokenizer
    ids = build_draft_vocab([[5, 5, 6, 7], [5, 6, 9]], 3)
    assert ids == [5, 6, 7]
    path = save_draft_vocab(tmp_path / "dv.json", list(range(20, 120)) + ids, tok)
    assert load_draft_vocab(path, tok)[:3] == [20, 21, 22]
    # The draft vocabulary only changes what is drafted: the output still equals final's.
    cfg = ExitConfig(policy="self-speculative", layer=2, num_draft=3, draft_vocab=str(path))
    ref = hf_greedy_generate(model, PROMPTS, 10, pad_id=0, eos=set())
    assert [r.token_ids for r in _engine(model).generate(PROMPTS, cfg, SamplingParams(max_new_tokens=10))] == ref

    class Other:
        def get_vocab(self):
            return {"a": 0, "b": 1}

        def __len__(self):
            return 2

    with pytest.raises(ConfigError, match="another tokenizer"):
        load_draft_vocab(path, Other())


@pytest.mark.parametrize("kwargs, message", [({"draft": "magic"}, "unknown draft source"),
                                             ({"draft_stop": 1.5}, "draft_stop"),
                                             ({"check_vocab": "most"}, "check_vocab")])
def test_bad_draft_options_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ExitConfig(policy="self-speculative", **kwargs)


def test_draft_vocab_builder_counts_the_models_own_answers(tiny_model_and_tokenizer, tmp_path):
    from layerexit.data.draft_vocab import build_for_model

    model, tok = tiny_model_and_tokenizer
    ids = build_for_model(model, tok, 50, limit=4, max_new_tokens=6, show_progress=False)
    assert len(ids) == 50 and len(set(ids)) == 50
    assert all(0 <= t < model.config.vocab_size for t in ids)


@pytest.mark.parametrize("cfg", [ExitConfig(policy="final"), ExitConfig(policy="fixed", layer=2, kv="propagate"),
                                 ExitConfig(policy="self-speculative", layer=2, draft="layer+ngram")])
def test_fused_projections_decode_the_same_tokens(tiny_model, cfg):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    fused = EarlyExitEngine(tiny_model, set(), 0, fused=True)
    stock = EarlyExitEngine(tiny_model, set(), 0, fused=False)
    assert fused.fused is not None and stock.fused is None
    a = fused.generate(REPEATING, cfg, SamplingParams(max_new_tokens=10))
    b = stock.generate(REPEATING, cfg, SamplingParams(max_new_tokens=10))
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.flops for r in a] == [r.flops for r in b]
    after = tiny_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model's own weights are untouched


def test_fused_projections_respect_their_memory_budget(tiny_model):
    from layerexit.engine.layers import fuse_layers

    assert fuse_layers(tiny_model.model.layers, budget=10) is None
    assert fuse_layers(tiny_model.model.layers) is not None
