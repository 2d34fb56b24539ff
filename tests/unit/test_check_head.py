"""Cheap exit checks (issue 30): the static check head decides over N rows of the LM head, a row that exits takes
its token from the full head (exactly the full head's argmax at its exit layer), FLOPs are what runs, and bad
settings name the field."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from layerexit.engine.decode import EarlyExitEngine
from layerexit.engine.flops import FlopsModel
from layerexit.engine.options import ExitConfig, SamplingParams
from layerexit.errors import ConfigError

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
THRESHOLDS = {1: 0.02, 2: 0.03, 3: 0.04}


def _vocab_file(path, ids, vocab_size):
    path.write_text(json.dumps({"format": "layerexit-draft-vocab/1", "tokenizer": "x", "vocab_size": vocab_size,
                                "token_ids": [int(t) for t in ids]}))
    return str(path)


def _static(tmp_path, model, n=40, **kw):
    ids = list(range(0, 2 * n, 2))  # every other id: many argmaxes fall outside the subset
    f = _vocab_file(tmp_path / "check_vocab.json", ids, model.config.vocab_size)
    return ExitConfig(policy="confidence", thresholds=THRESHOLDS, check_head="static", check_vocab=n,
                      check_vocab_file=f, **kw)


def test_exiting_row_gets_the_full_heads_argmax(tiny_model, tmp_path):
    """kv recompute keeps every layer's hidden state exact, so each token must equal the full head's argmax at the
    layer it exited from on the same prefix, even where that token is not in the static check vocabulary."""
    from layerexit.models.exits import collect_hidden_states, decoder_parts, exit_hidden

    cfg = _static(tmp_path, tiny_model, kv="recompute")
    out = EarlyExitEngine(tiny_model, set(), 0).generate(PROMPTS, cfg, SamplingParams(max_new_tokens=8))
    parts = decoder_parts(tiny_model)
    static = set(range(0, 80, 2))
    early = outside = 0
    for prompt, r in zip(PROMPTS, out):
        ids = torch.tensor([prompt + r.token_ids[:-1]])
        with torch.no_grad():
            hidden = collect_hidden_states(tiny_model, ids, range(1, 5))
        for i, (tok, layer) in enumerate(zip(r.token_ids, r.exit_layers)):
            h = hidden[layer][:, len(prompt) - 1 + i]
            want = int(parts.head(parts.norm(exit_hidden(parts, layer, h))).argmax(-1))
            assert tok == want, (i, layer)
            early += layer < 4
            outside += layer < 4 and tok not in static
    assert early > 0 and outside > 0, "some rows must exit with a token outside the static vocabulary"


@pytest.mark.parametrize("logprobs", [None, 2])
def test_static_check_flops_match_flop_counter(tmp_path, logprobs):
    from torch.utils.flop_counter import FlopCounterMode

    from layerexit.models.tiny import build_tiny_llama

    model = build_tiny_llama(num_layers=4)
    model.config._attn_implementation = "eager"  # CPU SDPA kernels are invisible to FlopCounterMode
    cfg = _static(tmp_path, model, n=24, kv="propagate")
    with FlopCounterMode(display=False) as counter:
        out = EarlyExitEngine(model, set(), 0).generate(PROMPTS, cfg, SamplingParams(max_new_tokens=7,
                                                                                    logprobs=logprobs))
    ours = sum(r.flops + r.prefill_flops for r in out)
    measured = counter.get_total_flops()
    assert abs(ours - measured) / measured < 0.01, (ours, measured)
    assert any(l < 4 for r in out for l in r.exit_layers)


def test_static_check_costs_less_than_full_checks(tiny_model, tmp_path):
    """Same thresholds, a 24-id check head: every check that does not exit costs 2*H*24 instead of 2*H*V."""
    engine = EarlyExitEngine(tiny_model, set(), 0)
    sp = SamplingParams(max_new_tokens=6)
    full = engine.generate(PROMPTS, ExitConfig(policy="confidence", thresholds={1: 0.99, 2: 0.99, 3: 0.99},
                                               kv="propagate"), sp)
    cheap = engine.generate(PROMPTS, _static(tmp_path, tiny_model, n=24, kv="propagate").model_copy(
        update={"thresholds": {1: 0.99, 2: 0.99, 3: 0.99}}), sp)
    f = FlopsModel.from_config(tiny_model.config)
    for a, b in zip(full, cheap):
        assert a.exit_layers == b.exit_layers == [4] * len(a.exit_layers)  # nobody exits: same layers
        saved = len(a.exit_layers) * 3 * (f.head(1) - 2 * f.hidden * 24)
        assert a.flops - b.flops == saved


def test_bad_check_settings_name_the_field(tiny_model, tmp_path):
    from layerexit.engine.heads import load_check_vocab

    V = tiny_model.config.vocab_size
    engine = EarlyExitEngine(tiny_model, set(), 0)
    sp = SamplingParams(max_new_tokens=2)
    f = _vocab_file(tmp_path / "v.json", range(V), V)
    with pytest.raises(ConfigError, match="check_vocab"):
        engine.generate(PROMPTS, ExitConfig(policy="confidence", check_head="static", check_vocab=V + 1,
                                            check_vocab_file=f), sp)
    other = _vocab_file(tmp_path / "other.json", range(100), V + 7)
    with pytest.raises(ConfigError, match="check_vocab_file .* another tokenizer"):
        engine.generate(PROMPTS, ExitConfig(policy="confidence", check_head="static", check_vocab=50,
                                            check_vocab_file=other), sp)

    class Tok:
        def get_vocab(self):
            return {"a": 0, "b": 1}

    with pytest.raises(ConfigError, match="check_vocab_file .* another tokenizer"):
        load_check_vocab(f, 10, V, tokenizer=Tok())
    with pytest.raises(ConfigError, match="check_vocab_file .* does not exist"):
        load_check_vocab(tmp_path / "missing.json", 10, V)
    with pytest.raises(ValueError, match="check_vocab_file"):
        ExitConfig(policy="confidence", check_head="static", check_vocab=10)
    with pytest.raises(ValueError, match="check_vocab"):
        ExitConfig(policy="confidence", check_head="candidates")


@pytest.mark.parametrize("kv", ["recompute", "propagate"])
def test_trace_pricing_of_the_static_head_equals_the_engine(tiny_model, tmp_path, kv):
    from layerexit.engine.traces import ExitTraces
    from layerexit.tuning.objective import TraceScorer

    flops = FlopsModel.from_config(tiny_model.config)
    engine = EarlyExitEngine(tiny_model, set(), 0)
    cfg = _static(tmp_path, tiny_model, n=24, kv=kv)
    early = 0
    for prompt in PROMPTS:
        r = engine.generate([prompt], cfg, SamplingParams(max_new_tokens=8))[0]
        exits = np.array(r.exit_layers)
        n = len(exits)
        z = np.zeros((n, 4))
        traces = ExitTraces([1, 2, 3, 4], z.astype(int), z, z, np.arange(len(prompt), len(prompt) + n),
                            np.zeros(n, dtype=int), check_conf={"static:24": z})
        checks = np.array([sum(l <= e for l in THRESHOLDS) + (e == 4) for e in exits])
        scorer = TraceScorer(traces, flops, kv, check_head="static:24")
        assert scorer.flops_of(exits, checks, num_checked=3) == pytest.approx(r.flops, rel=1e-12)
        early += int((exits < 4).sum())
    assert early > 0


def test_traced_static_confidences_predict_the_engines_exits(tiny_model, tmp_path):
    """kv recompute: traced along the engine's own tokens, the static head's confidences give its exit layers."""
    from layerexit.engine.traces import record_traces
    from layerexit.tuning.objective import TraceScorer

    heads = {"static:24": list(range(0, 48, 2))}
    first = record_traces(tiny_model, PROMPTS, [[20 + i for i in range(8)]] * 3, [1, 2, 3], show_progress=False,
                          check_heads=heads)
    # Thresholds at each layer's median static confidence: some rows exit at each layer, some go on.
    thr = {l: float(np.median(first.check_conf["static:24"][:, j])) for j, l in enumerate([1, 2, 3])}
    cfg = _static(tmp_path, tiny_model, n=24, kv="recompute").model_copy(update={"thresholds": thr})
    got = EarlyExitEngine(tiny_model, set(), 0).generate(PROMPTS, cfg, SamplingParams(max_new_tokens=8))
    traces = record_traces(tiny_model, PROMPTS, [r.token_ids for r in got], [1, 2, 3], show_progress=False,
                           check_heads={"static:24": list(range(0, 48, 2)), "candidates:5": None})
    loaded = type(traces).load(_save(traces, tmp_path / "t.npz"))
    assert set(loaded.check_conf) == {"static:24", "candidates:5"}
    scorer = TraceScorer(loaded, FlopsModel.from_config(tiny_model.config), "recompute", check_head="static:24")
    exit_col, _ = scorer.threshold_exits(thr)
    engine_layers = np.concatenate([r.exit_layers for r in got])
    assert (np.array(scorer.layers)[exit_col] == engine_layers).all()
    assert len(set(engine_layers.tolist())) > 1
    full = TraceScorer(loaded, FlopsModel.from_config(tiny_model.config), "recompute")
    assert not (np.array(full.layers)[full.threshold_exits(thr)[0]] == engine_layers).all()


def _save(traces, path):
    traces.save(path)
    return path


def test_preset_shipped_with_the_model(tiny_dir, tmp_path):
    """A model directory's exit_presets.json: {"preset": "tuned"} runs what the preset holds (its static check
    vocabulary relative to the directory); an unknown preset names the field; a request naming a preset starts
    from it, not from the deployment default."""
    import shutil

    from layerexit.models.exit_presets import write_exit_presets
    from layerexit.models.loading import load_model_and_tokenizer
    from layerexit.serving.protocol import EarlyExitRequest, merge_exit_config

    d = tmp_path / "model"
    shutil.copytree(tiny_dir, d)
    model, _ = load_model_and_tokenizer(str(d))
    V = model.config.vocab_size
    _vocab_file(d / "check_vocab.json", range(0, 80, 2), V)
    preset = {"policy": "confidence", "thresholds": {1: 0.05, 2: 0.05, 3: 0.05}, "kv": "propagate",
              "check_head": "static", "check_vocab": 40, "check_vocab_file": "check_vocab.json",
              "measured": {"flops_ratio": 0.5}}
    write_exit_presets(d, {"tuned": preset})
    model, _ = load_model_and_tokenizer(str(d))
    engine = EarlyExitEngine(model, set(), 0)
    sp = SamplingParams(max_new_tokens=6)
    explicit = ExitConfig(**{**{k: v for k, v in preset.items() if k != "measured"},
                             "check_vocab_file": str(d / "check_vocab.json")})
    want = engine.generate(PROMPTS, explicit, sp)
    got = engine.generate(PROMPTS, ExitConfig(preset="tuned"), sp)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert [r.flops for r in got] == [r.flops for r in want]
    assert any(l < 4 for r in got for l in r.exit_layers)
    # an explicit field wins over the preset's
    deep = engine.generate(PROMPTS, ExitConfig(preset="tuned", thresholds={1: 1.0, 2: 1.0, 3: 1.0}), sp)
    assert all(l == 4 for r in deep for l in r.exit_layers)
    with pytest.raises(ConfigError, match="preset 'fast'"):
        engine.generate(PROMPTS, ExitConfig(preset="fast"), sp)
    merged = merge_exit_config(ExitConfig(policy="confidence", thresholds="paper-7b"), EarlyExitRequest(preset="tuned"))
    assert merged.preset == "tuned" and merged.model_fields_set == {"preset"}
    # a deployment whose default is the preset: a request's own field joins it, the preset fills the rest
    merged = merge_exit_config(ExitConfig(preset="tuned"), EarlyExitRequest(kv="recompute"))
    assert merged.model_fields_set == {"preset", "kv"}
    resolved = engine.generate(PROMPTS, merged, sp)
    assert any(l < 4 for r in resolved for l in r.exit_layers)


def test_confirmation_runs_the_searched_check_head():
    from layerexit.tuning.confirm import exit_config_for
    from layerexit.tuning.pareto import Point, cheapest_at, fronts_by

    p = Point("t", 0.8, 0.9, {8: 0.7}, "trial", {"check_head": "static:512"})
    cfg = ExitConfig(**exit_config_for(p, "propagate", check_vocab_file="/x/v.json"))
    assert (cfg.check_head, cfg.check_vocab, cfg.check_vocab_file) == ("static", 512, "/x/v.json")
    q = Point("c", 0.9, 0.95, {8: 0.7}, "trial", {"check_head": "candidates:64"})
    assert ExitConfig(**exit_config_for(q, "propagate")).resolved_check_head() == "candidates"
    final = Point("final", 1.0, 1.0, {}, "final")
    fronts = fronts_by([p, q, Point("u", 0.95, 0.85, {8: 0.6}, "trial", {"check_head": "static:512"})],
                       "check_head", final)
    assert set(fronts) == {"static:512", "candidates:64"}
    assert cheapest_at(fronts["static:512"], 0.9).name == "t"


def test_bench_similarity_and_preset_rows(tiny_dir, prompts_file, tmp_path, capsys):
    """`layerexit bench --similarity` sets spaCy and MiniLM similarity to `final`'s answers on every engine row
    (1.0 for `final` itself), and --config 'x={"preset": "tuned"}' runs the preset the model ships."""
    import shutil

    from layerexit.cli import main
    from layerexit.models.exit_presets import write_exit_presets

    d = tmp_path / "model"
    shutil.copytree(tiny_dir, d)
    write_exit_presets(d, {"tuned": {"policy": "fixed", "layer": 1, "kv": "propagate"}})
    code = main(["bench", "--model", str(d), "--prompts", str(prompts_file), "--limit", "2", "--max-new-tokens",
                 "6", "--policies", "final", "--threads", "1", "--dtype", "float32", "--similarity",
                 "--config", 'x={"preset": "tuned"}', "--json", "--bandwidth-mib", "16", "--replay", "none"])
    assert code == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out.strip().splitlines()[-1])}
    assert rows["final"]["similarity"] == pytest.approx(1.0) and rows["final"]["similarity_minilm"] == \
        pytest.approx(1.0, abs=1e-4)
    assert rows["x"]["mean_exit_layer"] == 1.0  # the preset ran: a fixed exit at layer 1
    assert rows["x"]["similarity"] is not None and rows["x"]["similarity_minilm"] < 0.999


def test_static_check_head_runs_in_the_compiled_path(tmp_path):
    """The compiled decode path (static shapes, propagate K/V for skipped layers) gives eager's tokens, exits and
    FLOPs in float32 with the static check head."""
    from layerexit.models.tiny import build_tiny_llama

    model = build_tiny_llama(num_layers=4)
    cfg = _static(tmp_path, model, n=40, kv="propagate").model_copy(update={"thresholds": {1: 0.06, 2: 0.05, 3: 0.04}})
    sp = SamplingParams(max_new_tokens=8)
    eager = EarlyExitEngine(model, set(), 0).generate(PROMPTS, cfg, sp)
    engine = EarlyExitEngine(model, set(), 0, compile=True)
    calls = []
    run = engine.compiled.run
    engine.compiled.run = lambda *a, **k: calls.append(a[:2]) or run(*a, **k)  # segments between exit points
    compiled = engine.generate(PROMPTS, cfg, sp)
    assert engine.compiled.active and calls
    assert [(r.token_ids, r.exit_layers, r.flops) for r in compiled] == \
        [(r.token_ids, r.exit_layers, r.flops) for r in eager]


def test_register_exit_preset_makes_a_loadable_tuned_version(tmp_path, monkeypatch, tiny_dir):
    """The search's registration: a new version of the registered model carrying exit_presets.json (and its static
    check vocabulary), aliased `tuned`; loading models:/name@tuned runs {"preset": "tuned"}."""
    import mlflow

    from layerexit.models.exit_presets import exit_presets_of
    from layerexit.models.loading import load_model_and_tokenizer
    from layerexit.serving.model_source import resolve_model_source
    from layerexit.tracking import log_hf_model, tracked_run
    from layerexit.tuning.export import register_exit_preset

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("LAYEREXIT_HOME", str(tmp_path / "home"))
    with tracked_run("exits", tracking_uri=uri):
        log_hf_model(tiny_dir, registered_name="tiny-exits", alias="trained")
    src = resolve_model_source("models:/tiny-exits@trained", uri, cache_root=tmp_path / "cache")
    V = json.loads((tiny_dir / "config.json").read_text())["vocab_size"]
    vocab = _vocab_file(tmp_path / "cv.json", range(0, 80, 2), V)
    block = {"policy": "confidence", "thresholds": {1: 0.05, 2: 0.05, 3: 0.05}, "kv": "propagate",
             "check_head": "static", "check_vocab": 40, "check_vocab_file": vocab}
    with tracked_run("tune", tracking_uri=uri) as run:
        run_id = run.run_id if hasattr(run, "run_id") else mlflow.active_run().info.run_id
    reg = register_exit_preset("tiny-exits", src.local_dir, "tuned", block, {"flops_ratio": 0.7}, tmp_path / "w",
                               run_id, uri)
    assert str(reg["version"]) == "2"
    model, _ = load_model_and_tokenizer("models:/tiny-exits@tuned")
    presets = exit_presets_of(model)
    assert presets["tuned"]["check_head"] == "static" and presets["tuned"]["measured"] == {"flops_ratio": 0.7}
    assert presets["tuned"]["check_vocab_file"].endswith("check_vocab.json")
    out = EarlyExitEngine(model, set(), 0).generate(PROMPTS, ExitConfig(preset="tuned"), SamplingParams(max_new_tokens=4))
    assert any(l < 4 for r in out for l in r.exit_layers)
