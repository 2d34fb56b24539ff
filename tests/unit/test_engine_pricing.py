"""Threshold search prices what the engine does: candidate-set checks (check_vocab) and the batch rule
(a Serve batch runs every row to its deepest exit)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layerexit.engine.decode import EarlyExitEngine
from layerexit.engine.flops import FlopsModel
from layerexit.engine.options import ExitConfig, SamplingParams
from layerexit.engine.traces import ExitTraces
from layerexit.tuning.objective import TraceScorer

THRESHOLDS = {1: 0.02, 2: 0.025, 3: 0.03}


def _positions_only(prompt_lens, ns) -> ExitTraces:
    ctx = np.concatenate([np.arange(p, p + n) for p, n in zip(prompt_lens, ns)])
    seq = np.concatenate([np.full(n, i) for i, n in enumerate(ns)])
    z = np.zeros((len(ctx), 4))
    return ExitTraces([1, 2, 3, 4], z.astype(int), z, z, ctx, seq)


def _checks(exits, checked, L=4):
    return np.array([sum(l <= e for l in checked) + (e == L) for e in exits])


@pytest.mark.parametrize("kv", ["recompute", "propagate"])
@pytest.mark.parametrize("k", [5, 40])
def test_candidate_set_pricing_equals_the_engine(tiny_model, kv, k):
    flops = FlopsModel.from_config(tiny_model.config)
    engine = EarlyExitEngine(tiny_model, set(), 0)
    g = torch.Generator().manual_seed(1)
    early = 0
    for n in (4, 7):
        prompt = torch.randint(3, 500, (n,), generator=g).tolist()
        r = engine.generate([prompt], ExitConfig(policy="confidence", thresholds=THRESHOLDS, kv=kv, check_vocab=k),
                            SamplingParams(max_new_tokens=8))[0]
        exits = np.array(r.exit_layers)
        scorer = TraceScorer(_positions_only([n], [len(exits)]), flops, kv, check_vocab=k)
        assert scorer.flops_of(exits, _checks(exits, sorted(THRESHOLDS))) == pytest.approx(r.flops, rel=1e-12)
        full = TraceScorer(_positions_only([n], [len(exits)]), flops, kv)
        assert full.flops_of(exits, _checks(exits, sorted(THRESHOLDS))) > r.flops
        early += int((exits < 4).sum())
    assert early > 0


def test_batch_rule_pricing_equals_the_engine(tiny_model):
    """Four equal-length prompts decoded together: each row pays for the deepest exit of its step."""
    flops = FlopsModel.from_config(tiny_model.config)
    engine = EarlyExitEngine(tiny_model, set(), 0)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 500, (5,), generator=g).tolist() for _ in range(4)]
    cfg = ExitConfig(policy="confidence", thresholds=THRESHOLDS, kv="propagate")
    out = engine.generate(prompts, cfg, SamplingParams(max_new_tokens=6))
    exits = np.concatenate([r.exit_layers for r in out])
    traces = _positions_only([5] * 4, [len(r.exit_layers) for r in out])
    checks = _checks(exits, sorted(THRESHOLDS))
    batched = TraceScorer(traces, flops, "propagate", batch_size=4).flops_of(exits, checks)
    assert batched == pytest.approx(sum(r.flops for r in out), rel=1e-12)
    alone = TraceScorer(traces, flops, "propagate").flops_of(exits, checks)
    assert len(set(exits.tolist())) > 1 and alone < batched


def test_bad_pricing_options():
    flops = FlopsModel.from_config(type("C", (), dict(hidden_size=8, num_attention_heads=2, intermediate_size=16,
                                                      vocab_size=50, num_hidden_layers=4))())
    traces = _positions_only([3], [2])
    with pytest.raises(ValueError, match="check_vocab"):
        TraceScorer(traces, flops, check_vocab=51)
    with pytest.raises(ValueError, match="batch_size"):
        TraceScorer(traces, flops, batch_size=0)


def test_candidate_set_traces_predict_the_engines_exits(tiny_model):
    from layerexit.engine.reference import hf_greedy_generate
    from layerexit.engine.traces import record_traces

    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (4, 6, 5, 7, 3, 8) * 3]
    responses = hf_greedy_generate(tiny_model, prompts, 8, 0, set())
    K = 6
    traces = record_traces(tiny_model, prompts, responses, [1, 2, 3], show_progress=False, check_vocab=K)
    # Thresholds in the middle of the widest gap near each layer's median confidence (no float-noise flips).
    thresholds = {}
    for j, layer in enumerate(traces.layers[:-1]):
        v = np.unique(traces.conf[:, j])
        mid = len(v) // 2
        i = max(1, mid - len(v) // 8) + int(np.argmax(np.diff(v[max(0, mid - len(v) // 8): mid + len(v) // 8 + 1])))
        thresholds[layer] = float((v[i - 1] + v[i]) / 2)
    flops = FlopsModel.from_config(tiny_model.config)
    exit_col, _ = TraceScorer(traces, flops, check_vocab=K).threshold_exits(thresholds)
    predicted = np.array(traces.layers)[exit_col]
    assert (predicted < 4).any() and (predicted == 4).any()
    engine = EarlyExitEngine(tiny_model, set(), 0)
    compared = early = 0
    for i, prompt in enumerate(prompts):
        r = engine.generate([prompt], ExitConfig(policy="confidence", thresholds=thresholds, check_vocab=K),
                            SamplingParams(max_new_tokens=8))[0]
        mask = traces.sequence == i
        div = next((k for k, (a, b) in enumerate(zip(r.token_ids, responses[i])) if a != b), len(responses[i]) - 1)
        assert r.exit_layers[: div + 1] == predicted[mask][: div + 1].tolist(), f"prompt {i}"
        compared += div + 1
        early += sum(1 for l in r.exit_layers[: div + 1] if l < 4)
    assert compared >= len(prompts) and early > 0


@pytest.mark.parametrize("kv", ["recompute", "propagate"])
def test_adapter_pricing_equals_the_engine(tiny_model, kv):
    """With exit adapters (the adapters recipe) every check at an adapted layer runs the adapter first; the search
    prices that exactly, so a wide adapter cannot look free on the traces."""
    from layerexit.models.adapters import build_adapters
    from layerexit.models.exits import attach_exit_adapters

    flops = FlopsModel.from_config(tiny_model.config)
    adapters = build_adapters([1, 3], tiny_model.config.hidden_size, rank=16)
    for a in adapters.values():
        torch.nn.init.normal_(a.up.weight, std=0.02)  # not the identity: exits move
    attach_exit_adapters(tiny_model, adapters)
    engine = EarlyExitEngine(tiny_model, set(), 0)
    per_pos = {l: a.flops(1) for l, a in adapters.items()}
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, 500, (6,), generator=g).tolist()
    r = engine.generate([prompt], ExitConfig(policy="confidence", thresholds=THRESHOLDS, kv=kv),
                        SamplingParams(max_new_tokens=8))[0]
    exits = np.array(r.exit_layers)
    checks = _checks(exits, sorted(THRESHOLDS))
    traces = _positions_only([6], [len(exits)])
    priced = TraceScorer(traces, flops, kv, adapter_flops=per_pos)
    assert priced.flops_of(exits, checks) == pytest.approx(r.flops, rel=1e-12)
    assert TraceScorer(traces, flops, kv).flops_of(exits, checks) < r.flops
