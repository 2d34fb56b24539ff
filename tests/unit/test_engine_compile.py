"""The compiled decode path (static cache + torch.compile'd layer segments) on a tiny LLaMA in fp32: the same
tokens, exit layers, FLOPs and cache as eager, and a logged fallback to eager when compiling fails."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from layerexit.engine.decode import EarlyExitEngine, SequenceResult
from layerexit.engine.options import ExitConfig, SamplingParams

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]  # unequal lengths: left padding
# Rows exit at several layers with these (see test_engine_v2's candidate-set test).
CONFIDENT = {1: 0.02, 2: 0.025, 3: 0.03}


def _pair(model):
    eager = EarlyExitEngine(model, eos_token_ids=set(), pad_token_id=0)
    compiled = EarlyExitEngine(model, eos_token_ids=set(), pad_token_id=0, compile=True)
    return eager, compiled


def _same(a: list[SequenceResult], b: list[SequenceResult]) -> None:
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.exit_layers for r in a] == [r.exit_layers for r in b]
    assert [r.flops for r in a] == [r.flops for r in b]


@pytest.mark.slow
@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["batch1", "batch3"])
def test_compiled_final_equals_eager(tiny_model, prompts):
    eager, compiled = _pair(tiny_model)
    eager.keep_last_cache = compiled.keep_last_cache = True
    sp = SamplingParams(max_new_tokens=12)
    _same(eager.generate(prompts, ExitConfig(), sp), compiled.generate(prompts, ExitConfig(), sp))
    assert compiled.compiled.active and compiled.compiled.calls > 0, "the compiled segment never ran"
    # The static writes (index_copy_ at column t) leave the cache eager's update leaves.
    a, b = eager.last_cache, compiled.last_cache
    assert a.lengths == b.lengths
    for ka, kb, va, vb in zip(a.keys, b.keys, a.values, b.values):
        end = a.lengths[0]
        torch.testing.assert_close(kb[:, :, :end], ka[:, :, :end], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vb[:, :, :end], va[:, :, :end], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_unfused_layers_equal_eager(tiny_model):
    """Engines without fused copies (a model over their memory budget) compile the separate projections."""
    eager = EarlyExitEngine(tiny_model, eos_token_ids=set(), pad_token_id=0, fused=False)
    compiled = EarlyExitEngine(tiny_model, eos_token_ids=set(), pad_token_id=0, fused=False, compile=True)
    sp = SamplingParams(max_new_tokens=10)
    _same(eager.generate(PROMPTS[:1], ExitConfig(), sp), compiled.generate(PROMPTS[:1], ExitConfig(), sp))
    assert compiled.compiled.active and compiled.compiled.calls > 0


@pytest.mark.slow
@pytest.mark.parametrize("kv", ["propagate", "recompute"])
def test_compiled_early_exit_equals_eager(tiny_model, kv):
    """Segments between exit points (one per checked layer here), with catch-up passes (recompute) left eager."""
    eager, compiled = _pair(tiny_model)
    cfg = ExitConfig(policy="confidence", thresholds=CONFIDENT, kv=kv)
    sp = SamplingParams(max_new_tokens=12)
    ref = eager.generate(PROMPTS, cfg, sp)
    assert len({l for r in ref for l in r.exit_layers}) > 1, "thresholds should make rows exit at several layers"
    _same(ref, compiled.generate(PROMPTS, cfg, sp))
    assert compiled.compiled.active and compiled.compiled.calls > 0


@pytest.mark.slow
@pytest.mark.parametrize("draft", ["layer", "ngram"])
def test_compiled_self_speculative_equals_final(tiny_model, draft):
    """Layer drafts (one column through layers 1..d) run compiled; verification stays eager; still lossless."""
    eager, compiled = _pair(tiny_model)
    sp = SamplingParams(max_new_tokens=12)
    cfg = ExitConfig(policy="self-speculative", layer=2, num_draft=3, draft=draft)
    out = compiled.generate(PROMPTS, cfg, sp)
    assert [r.token_ids for r in out] == [r.token_ids for r in eager.generate(PROMPTS, ExitConfig(), sp)]
    _same(eager.generate(PROMPTS, cfg, sp), out)
    assert compiled.compiled.active and compiled.compiled.calls > 0


class _JoinOnce:
    """Offers ``late`` prompts once, at the second admission."""

    def __init__(self, late):
        self.late, self.calls = list(late), 0

    def admit(self, max_prompt_len, rows):
        self.calls += 1
        if self.calls < 2:
            return []
        fit = [(p, SamplingParams(max_new_tokens=n)) for p, n in self.late if len(p) <= max_prompt_len]
        self.late = [x for x in self.late if len(x[0]) > max_prompt_len]
        return fit

    def cancelled(self, index):
        return False


@pytest.mark.slow
def test_compiled_continuous_batching_equals_eager(tiny_model):
    """Rows join (the buffers widen past their width: a new width, no new graph) and leave (batch shrinks)."""
    late = [([20, 21, 22], 6), ([23, 24, 25, 26, 27], 25)]
    out = []
    engines = _pair(tiny_model)
    for engine in engines:
        tokens: dict[int, list[int]] = {}
        for step in engine.stream(PROMPTS, ExitConfig(kv="propagate"), SamplingParams(max_new_tokens=10),
                                  joiner=_JoinOnce(late)):
            for ev in step:
                tokens.setdefault(ev.index, []).append(ev.token_id)
        out.append(tokens)
    assert sorted(out[0]) == [0, 1, 2, 3, 4]
    assert out[1] == out[0]
    assert engines[1].compiled.active and engines[1].compiled.calls > 0


def test_a_failing_compile_falls_back_to_eager_with_one_warning(tiny_model, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler on this machine")

    monkeypatch.setattr(torch, "compile", broken)
    eager, compiled = _pair(tiny_model)
    sp = SamplingParams(max_new_tokens=8)
    cfg = ExitConfig(policy="confidence", thresholds=CONFIDENT, kv="propagate")
    with caplog.at_level(logging.WARNING, logger="layerexit.engine.compiled"):
        _same(eager.generate(PROMPTS, cfg, sp), compiled.generate(PROMPTS, cfg, sp))
        _same(eager.generate(PROMPTS[:1], ExitConfig(), sp), compiled.generate(PROMPTS[:1], ExitConfig(), sp))
    warnings = [r.getMessage() for r in caplog.records if r.name == "layerexit.engine.compiled"]
    assert len(warnings) == 1, warnings
    assert "no C++ compiler on this machine" in warnings[0] and "eager" in warnings[0]
    assert not compiled.compiled.active


def test_past_the_recompile_limit_new_shapes_run_eager_and_compiling_stays_on(tiny_model, caplog):
    def over_limit(*args, **kwargs):
        raise torch._dynamo.exc.FailOnRecompileLimitHit("Hard failure due to fullgraph=True")

    eager, compiled = _pair(tiny_model)
    compiled.compiled._fn = over_limit  # what torch.compile(fullgraph=True) raises for one shape too many
    sp = SamplingParams(max_new_tokens=6)
    with caplog.at_level(logging.WARNING, logger="layerexit.engine.compiled"):
        _same(eager.generate(PROMPTS, ExitConfig(), sp), compiled.generate(PROMPTS, ExitConfig(), sp))
    assert compiled.compiled.active
    assert len([r for r in caplog.records if r.name == "layerexit.engine.compiled"]) == 1


def test_an_unsupported_layout_stays_eager_with_the_reason(tiny_model, caplog):
    tiny_model.config.hidden_act = "gelu"  # the static layer implements SiLU only
    with caplog.at_level(logging.WARNING, logger="layerexit.engine.compiled"):
        _, compiled = _pair(tiny_model)
    assert not compiled.compiled.active and "gelu" in compiled.compiled.failed
    assert any("gelu" in r.getMessage() for r in caplog.records)


def test_serve_args_take_compile_and_still_reject_unknown_keys():
    from layerexit.serving.config import ServeArgs

    assert ServeArgs.model_validate({"compile": True}).compile is True
    assert ServeArgs.model_validate({}).compile is False
    with pytest.raises(ValueError, match="compiled"):
        ServeArgs.model_validate({"compiled": True})


@pytest.mark.slow
def test_bench_and_generate_take_compile(tiny_dir, prompts_file, capsys):
    from layerexit.cli import main

    code = main(["bench", "--model", str(tiny_dir), "--prompts", str(prompts_file), "--limit", "2",
                 "--max-new-tokens", "4", "--policies", "final", "--threads", "1", "--compile", "--json",
                 "--dtype", "float32", "--bandwidth-mib", "64"])
    assert code == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out.strip().splitlines()[-1])}
    # compile_seconds: 0 when an earlier test in this process compiled the same graphs (dynamo keeps them)
    assert rows["final +compile"]["identical"] == 1.0 and rows["final +compile"]["compile_seconds"] >= 0
    assert rows["final +compile"]["timed_compile_seconds"] == 0.0, "the warm-up met every shape"
    assert rows["final"]["compile_seconds"] is None
    # transformers' own static cache with an inductor-compiled forward: the same tokens, its warm-up timed apart
    static = rows["hf-generate-static-compiled"]
    assert static["agreement"] == 1.0 and static["compile_seconds"] > 0 and static["tokens_per_s"] > 0
    args = ["generate", "--model", str(tiny_dir), "--prompt", "hi there", "--max-new-tokens", "5", "--json",
            "--dtype", "float32"]
    assert main(args) == 0
    eager = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main([*args, "--compile"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"] == eager["token_ids"]
