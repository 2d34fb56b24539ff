"""Threshold search pieces without Ray: trace scoring vs real generation, search space, Pareto front, export."""

from __future__ import annotations

import itertools
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from layerexit.config import load_config
from layerexit.engine.decode import EarlyExitEngine
from layerexit.engine.flops import FlopsModel
from layerexit.engine.options import ExitConfig, SamplingParams
from layerexit.engine.reference import hf_greedy_generate
from layerexit.engine.thresholds import load_thresholds_file
from layerexit.engine.traces import ExitTraces, record_traces
from layerexit.errors import ConfigError
from layerexit.tuning.config import SearchSpaceSettings, TuneSearchConfig
from layerexit.tuning.export import rewrite_serve_config, user_config_block, write_thresholds_file
from layerexit.tuning.objective import TraceScorer
from layerexit.tuning.pareto import Point, dominates, pareto_front, spread
from layerexit.tuning.space import ThresholdSpace

REPO = Path(__file__).resolve().parents[2]
MAX_NEW = 10


@pytest.fixture(scope="module")
def traced():
    from layerexit.models.tiny import build_tiny_llama

    model = build_tiny_llama(num_layers=4)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 9, (16,), generator=g).tolist()
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in lengths]
    responses = hf_greedy_generate(model, prompts, MAX_NEW, 0, set())
    traces = record_traces(model, prompts, responses, [1, 2, 3], show_progress=False)
    return model, prompts, responses, traces


def _thresholds_between_confidences(traces: ExitTraces, quantiles) -> dict[int, float]:
    """Per layer, a threshold near the given quantile of its confidences, in the middle of the widest gap between
    recorded confidences nearby (so float noise between traces and the engine cannot flip a decision)."""
    out = {}
    for j, (layer, q) in enumerate(zip(traces.layers[:-1], quantiles)):
        values = np.unique(traces.conf[:, j])
        centre = int(q * (len(values) - 1))
        lo, hi = max(1, centre - len(values) // 10), min(len(values) - 1, centre + len(values) // 10)
        i = lo + int(np.argmax(values[lo : hi + 1] - values[lo - 1 : hi]))
        out[layer] = float((values[i - 1] + values[i]) / 2)
        assert np.abs(traces.conf[:, j] - out[layer]).min() > 1e-5
    return out


def _sub(traces: ExitTraces, mask) -> ExitTraces:
    return ExitTraces(traces.layers, traces.top1[mask], traces.conf[mask], traces.gap[mask], traces.context[mask],
                      traces.sequence[mask])


@pytest.mark.parametrize("quantiles", [(0.9, 0.8, 0.7), (0.6, 0.5, 0.4), (0.95, 0.3, 0.9)])
def test_trace_scoring_equals_engine_exit_decisions(traced, quantiles):
    model, prompts, responses, traces = traced
    thresholds = _thresholds_between_confidences(traces, quantiles)
    flops = FlopsModel.from_config(model.config)
    scorer = TraceScorer(traces, flops)
    exit_col, _ = scorer.threshold_exits(thresholds)
    predicted = np.array(scorer.layers)[exit_col]
    assert (predicted < 4).any() and (predicted == 4).any()  # the rule really exits early, and not always
    engine = EarlyExitEngine(model, set(), 0)
    compared = identical = 0
    for i, prompt in enumerate(prompts):
        r = engine.generate([prompt], ExitConfig(policy="confidence", thresholds=thresholds, kv="recompute"),
                            SamplingParams(max_new_tokens=MAX_NEW))[0]
        mask = traces.sequence == i
        # Decisions are on the same prefix up to and including the first token that differs from the final's.
        div = next((k for k, (a, b) in enumerate(zip(r.token_ids, responses[i])) if a != b), len(responses[i]) - 1)
        assert r.exit_layers[: div + 1] == predicted[mask][: div + 1].tolist(), f"prompt {i}"
        compared += div + 1
        if r.token_ids == responses[i]:
            identical += 1
            # Same tokens: the simulated catch-up FLOPs equal the engine's count exactly.
            s = TraceScorer(_sub(traces, mask), flops).score(thresholds)
            assert (int(s.flops), int(s.flops_full)) == (r.flops, r.flops_full)
    assert compared >= 20
    if quantiles == (0.9, 0.8, 0.7):
        assert identical >= 1


def _positions_only_traces(prompt_len: int, n: int) -> ExitTraces:
    """Traces of n response tokens that carry only their positions (all FLOPs accounting needs)."""
    return ExitTraces([1, 2, 3, 4], np.zeros((n, 4), dtype=int), np.zeros((n, 4)), np.zeros((n, 4)),
                      np.arange(prompt_len, prompt_len + n), np.zeros(n, dtype=int))


@pytest.mark.parametrize("kv", ["recompute", "propagate", "none"])
def test_flops_accounting_equals_the_engine_for_any_exit_sequence(traced, kv):
    """Whatever tokens the engine produced (diverged from the final layer's or not), the objective's FLOPs model
    fed with the engine's exit layers gives the engine's own FLOPs count, per KV strategy."""
    model, prompts, _, traces = traced
    flops = FlopsModel.from_config(model.config)
    thresholds = _thresholds_between_confidences(traces, (0.6, 0.5, 0.4))
    checked = sorted(thresholds)
    engine = EarlyExitEngine(model, set(), 0)
    early = 0
    for prompt in prompts[:6]:
        r = engine.generate([prompt], ExitConfig(policy="confidence", thresholds=thresholds, kv=kv),
                            SamplingParams(max_new_tokens=MAX_NEW))[0]
        n = len(r.token_ids)
        fake = _positions_only_traces(len(prompt), n)
        exits = np.array(r.exit_layers)
        checks = np.array([sum(l <= e for l in checked) + (e == 4) for e in exits])
        scorer = TraceScorer(fake, flops, kv)
        assert scorer.flops_of(exits, checks) == pytest.approx(r.flops, rel=1e-12)
        assert scorer.flops_full == pytest.approx(r.flops_full, rel=1e-12)
        early += int((exits < 4).sum())
    assert early > 0


def test_scores_of_simple_rules(traced):
    model, _, _, traces = traced
    flops = FlopsModel.from_config(model.config)
    scorer = TraceScorer(traces, flops)
    final = scorer.score({})
    assert final.flops_ratio == pytest.approx(1.0) and final.agreement == 1.0 and final.exit_share == {4: 1.0}
    never = scorer.score({1: 1.0, 2: 1.0, 3: 1.0})  # three wasted head checks per token
    assert never.flops_ratio > 1.0 and never.checks_per_token == 4.0 and never.agreement == 1.0
    always = scorer.score({1: 0.0})
    assert always.exit_share == {1: 1.0}
    assert always.agreement == pytest.approx(traces.agrees()[:, 0].mean())
    # Always exiting at layer 1: layers 2..4 are never caught up, so recompute equals per-token accounting...
    assert TraceScorer(traces, flops, "per-token").score({1: 0.0}).flops == pytest.approx(always.flops)
    # ...while mixed depths make the deep layers catch up, which per-token accounting leaves out.
    mixed = _thresholds_between_confidences(traces, (0.5, 0.5, 0.5))
    assert TraceScorer(traces, flops, "per-token").score(mixed).flops < scorer.score(mixed).flops
    with pytest.raises(ValueError, match="not traced"):
        scorer.score({0: 0.1, 2: 0.5})


def test_pareto_front_is_exactly_the_non_dominated_points():
    pts = [Point("a", 0.5, 0.6), Point("b", 0.5, 0.7), Point("c", 0.4, 0.6), Point("d", 0.9, 0.95),
           Point("e", 0.9, 0.95), Point("f", 1.2, 0.9), Point("g", 0.3, 0.1)]
    front = pareto_front(pts)
    assert [p.name for p in front] == ["g", "c", "b", "d"]  # e duplicates d; a, f are dominated
    rng = random.Random(0)
    for _ in range(20):
        pts = [Point(str(i), round(rng.random(), 2), round(rng.random(), 2)) for i in range(40)]
        front = pareto_front(pts)
        # Brute force: non-dominated, and the first of identical (flops, quality) pairs.
        expected = [p.name for i, p in enumerate(pts)
                    if not any(dominates(q, p) for q in pts)
                    and not any((q.flops_ratio, q.quality) == (p.flops_ratio, p.quality) for q in pts[:i])]
        assert sorted(p.name for p in front) == sorted(expected)
        assert [p.flops_ratio for p in front] == sorted(p.flops_ratio for p in front)
        assert all(a.quality < b.quality for a, b in itertools.pairwise(front))
    assert [p.name for p in spread(front, 1)] == [front[0].name]
    picked = spread(front, 3)
    assert picked[0] is front[0] and picked[-1] is front[-1] and len(picked) == 3


@pytest.mark.parametrize("real, budget, ran, cheapest", [
    ([0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99], 8, [7, 3, 5, 4], 5),  # finds the first passing point (0.9)
    ([0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99], 2, [7, 3], 7),  # budget spent: best passing one so far
    ([0.1, 0.3, 0.5, 0.6], 5, [3], None),  # the most accurate fails: nothing cheaper is tried
    ([0.95, 0.3, 0.5, 0.99], 5, [3, 1, 2], 3),  # not monotone: still only confirmed points are chosen
    ([0.5, 0.95, 1.0], 1, [2, 1], 1),  # the final layer on top is free: the budget goes to tuned points
])
def test_bisect_front_finds_the_cheapest_point_reaching_the_minimum(real, budget, ran, cheapest):
    from layerexit.tuning.search import bisect_front

    front = [Point(str(i), 0.5 + i / 10, i / 10) for i in range(len(real))]
    if real[-1] == 1.0:
        front[-1] = Point(str(len(real) - 1), 1.0, 1.0, kind="final")
    order = []

    def confirm(p):
        order.append(int(p.name))
        return Point(p.name, p.flops_ratio, real[int(p.name)], kind="confirmed")

    confirmed = bisect_front(front, confirm, 0.9, budget)
    assert order == ran and [c.name for c in confirmed] == [str(i) for i in ran]
    passing = [int(c.name) for c in confirmed if c.quality >= 0.9]
    assert (min(passing) if passing else None) == cheapest


def test_space_keeps_thresholds_in_range_and_non_increasing():
    space = ThresholdSpace.from_settings(SearchSpaceSettings(
        exit_layers=[8, 12, 16, 20], threshold_range=(0.5, 0.9), layer_ranges={8: (0.8, 1.0), 20: (0.6, 0.7)},
        optional_layers=True)).check(30)
    rng = random.Random(1)
    for _ in range(300):
        params = {}
        for layer in space.layers:
            params[f"u_{layer:02d}"] = rng.random()
            params[f"use_{layer:02d}"] = rng.random() < 0.7
        thr = space.thresholds(params)
        on = {l for l in space.layers if params[f"use_{l:02d}"]}
        assert set(thr) == (on or {20})
        values = [thr[l] for l in sorted(thr)]
        assert values == sorted(values, reverse=True)
        for layer, v in thr.items():
            lo, hi = space.ranges[layer]
            assert lo - 1e-3 <= v <= hi + 1e-3
        back = space.params_for(thr)
        assert space.thresholds(back) == thr  # the inverse map finds the same point
    # Every layer off would be the final layer itself (a reference, not a search point): the deepest stays on.
    all_off = {**{f"u_{l:02d}": 0.5 for l in space.layers}, **{f"use_{l:02d}": False for l in space.layers}}
    assert list(space.thresholds(all_off)) == [20]
    assert space.params_for({}) is None
    assert ThresholdSpace.from_settings(SearchSpaceSettings(exit_layers=[1, 2])).params_for({1: 0.9}) is None


def test_grid_enumerates_distinct_feasible_sets():
    space = ThresholdSpace.from_settings(SearchSpaceSettings(exit_layers=[8, 16, 24], threshold_range=(0.6, 1.0),
                                                             optional_layers=True))
    grid = space.grid(3)
    keys = [tuple(sorted(t.items())) for t in grid]
    assert len(keys) == len(set(keys))
    assert {} not in grid and {16: 0.8} in grid and {8: 1.0, 16: 0.8, 24: 0.6} in grid
    assert {8: 0.6, 24: 0.8} not in grid  # increases with depth
    for t in grid:
        values = [t[l] for l in sorted(t)]
        assert values == sorted(values, reverse=True) and set(values) <= {0.6, 0.8, 1.0}
    # Without the constraint: the full product of 4 choices (off + 3 values) per layer, less "all off".
    free = ThresholdSpace.from_settings(SearchSpaceSettings(exit_layers=[8, 16, 24], threshold_range=(0.6, 1.0),
                                                            optional_layers=True, non_increasing=False))
    assert free.grid_size(3) == 4**3 - 1


@pytest.mark.parametrize("settings, message", [
    ({"exit_layers": []}, "search space is empty"),
    ({"exit_layers": [8, 16], "layer_ranges": {8: (0.5, 0.6), 16: (0.7, 0.9)}}, "must not increase with depth"),
    ({"exit_layers": [8, 40]}, "not intermediate layers"),
])
def test_empty_or_impossible_search_space_is_a_config_error(settings, message):
    with pytest.raises(ConfigError, match=message):
        ThresholdSpace.from_settings(SearchSpaceSettings(**settings)).check(30)


def test_increasing_ranges_are_fine_without_the_constraint():
    s = SearchSpaceSettings(exit_layers=[8, 16], layer_ranges={8: (0.5, 0.6), 16: (0.7, 0.9)}, non_increasing=False)
    space = ThresholdSpace.from_settings(s).check(30)
    assert space.thresholds({"u_08": 1.0, "u_16": 0.0}) == {8: 0.6, 16: 0.7}


# draft searches (their launch line runs jobs/tune_draft.py) are loaded in test_draft_search.py / test_every_config.py
@pytest.mark.parametrize("path", sorted(p for p in (REPO / "tune").glob("*.yaml")
                                        if "jobs/tune_draft.py" not in p.read_text().splitlines()[0]),
                         ids=lambda p: p.name)
def test_every_tune_yaml_loads(path):
    cfg = load_config(TuneSearchConfig, path)
    assert path.read_text().startswith("# ")  # opens with its launch command
    if cfg.space.exit_layers is None:  # the trained model's own exits, read when the job starts
        assert cfg.model.spec.startswith("models:/"), "only a trained model records its exits"
        with pytest.raises(ConfigError, match="space.exit_layers"):
            ThresholdSpace.from_settings(cfg.space)
    else:
        ThresholdSpace.from_settings(cfg.space).check()


@pytest.mark.parametrize("override, message", [
    ("space.threshold_range=[0.9,0.5]", "space.threshold_range"),
    ("space.layer_ranges={4: [0.5, 0.9]}", "not in exit_layers"),
    ("prompts.report={split: train, offset: 10, limit: 20}", "overlap"),
    ("quality.metric=bleu", "quality.metric"),
    ("search.algorithm=hyperopt", "search.algorithm"),
    ("search.num_trails=3", "unknown key"),
    ("search.seed_presets=[paper-70b]", "unknown presets"),
    ("check_vocab=0", "check_vocab"),
    ("search.batch_size=0", "search.batch_size"),
])
def test_bad_config_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(TuneSearchConfig, REPO / "tune" / "smollm2.yaml", [override])


def test_grid_over_budget_and_empty_space_fail_before_any_work(tmp_path):
    from layerexit.tuning.search import run_tuning

    cfg = load_config(TuneSearchConfig, REPO / "tune" / "tiny.yaml",
                      ["model=/does/not/matter", f"output_dir={tmp_path}", "search.algorithm=grid",
                       "search.grid_points=3", "search.num_trials=5"])
    with pytest.raises(ConfigError, match="10 points, over the trial budget of 5"):
        run_tuning(cfg)
    cfg = load_config(TuneSearchConfig, REPO / "tune" / "tiny.yaml", ["space.exit_layers=[]"])
    with pytest.raises(ConfigError, match="search space is empty"):
        run_tuning(cfg)


def test_job_script_help_and_bad_input(capsys, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("tune_thresholds_job", REPO / "jobs" / "tune_thresholds.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.__doc__.startswith("ray job submit --address http://127.0.0.1:8265 --working-dir . -- python "
                                  "jobs/tune_thresholds.py --config tune/smollm2.yaml")
    with pytest.raises(SystemExit) as exc:
        job.main(["--help"])
    assert exc.value.code == 0 and "--serve-config" in capsys.readouterr().out
    rc = job.main(["--config", str(REPO / "tune" / "tiny.yaml"), "space.exit_layers=[]"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "search space is empty" in err
    rc = job.main(["--config", str(tmp_path / "missing.yaml")])
    assert rc == 2 and "config file not found" in capsys.readouterr().err


SERVE_YAML = """\
# serve run this.yaml
# a header comment that must survive
applications:
  - name: other
    route_prefix: /other
    import_path: somewhere.else:app
  - name: layerexit-x
    route_prefix: /
    import_path: layerexit.serving.app:build_app
    args:
      model: smollm2   # the embedded model
    deployments:
      - name: EarlyExitLLM
        num_replicas: 1
        user_config:
          policy: fixed
          layer: 12          # stale key of the old policy
          # which thresholds to use
          thresholds: {8: 0.95, 12: 0.95}
          kv: none
"""


def test_export_rewrites_user_config_in_place_keeping_comments(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    from layerexit.serving.config import exit_config_from_user_config

    path = tmp_path / "serve.yaml"
    path.write_text(SERVE_YAML)
    block = user_config_block({16: 0.8, 8: 0.9}, "recompute")
    rewrite_serve_config(path, block, comment="tuned: test")
    text = path.read_text()
    for line in SERVE_YAML.splitlines():
        if line.strip().startswith("#") or "# the embedded model" in line:
            assert line in text  # every comment line is still there, unchanged
    assert "thresholds: {8: 0.9, 16: 0.8} # tuned: test" in text
    data = yaml.safe_load(text)
    uc = data["applications"][1]["deployments"][0]["user_config"]
    assert uc == {"policy": "confidence", "thresholds": {8: 0.9, 16: 0.8}, "kv": "recompute"}
    assert data["applications"][0] == {"name": "other", "route_prefix": "/other", "import_path": "somewhere.else:app"}
    ServeDeploySchema.model_validate(data)
    assert exit_config_from_user_config(uc).build_policy(30).thresholds == {8: 0.9, 16: 0.8}
    # Rewriting again with the same block changes nothing (stable round trip).
    assert rewrite_serve_config(path, block, comment="tuned: test") == text
    # No tuned set: the full model.
    rewrite_serve_config(path, user_config_block({}, "recompute"))
    uc = yaml.safe_load(path.read_text())["applications"][1]["deployments"][0]["user_config"]
    assert uc == {"policy": "final", "kv": "recompute"}


def test_export_to_the_real_serve_configs_and_thresholds_file(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    for name in ("smollm2.yaml", "7b_exits.yaml"):
        src = REPO / "serve_configs" / name
        if not src.is_file():
            continue
        dst = tmp_path / name
        dst.write_text(src.read_text())
        rewrite_serve_config(dst, user_config_block({8: 0.97, 20: 0.9}))
        before = [l for l in src.read_text().splitlines() if l.lstrip().startswith("#")]
        after = dst.read_text().splitlines()
        assert all(l in after for l in before)
        ServeDeploySchema.model_validate(yaml.safe_load(dst.read_text()))
    path = write_thresholds_file(tmp_path / "thr.yaml", "smollm2", 30, {20: 0.9, 8: 0.97}, "test")
    loaded = load_thresholds_file(path)
    assert loaded.thresholds == {8: 0.97, 20: 0.9} and loaded.exit_layers == [8, 20]
    assert ExitConfig(policy="confidence", thresholds=str(path)).build_policy(30).thresholds == {8: 0.97, 20: 0.9}


@pytest.mark.parametrize("text, message", [
    ("just: a mapping\n", "no `applications:` list"),
    ("applications:\n  - name: x\n    import_path: other:app\n", "no application importing layerexit.serving"),
    ("applications: [\n", "not valid YAML"),
])
def test_export_refuses_files_that_are_not_layerexit_serve_configs(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        rewrite_serve_config(path, user_config_block({8: 0.9}))
    assert path.read_text() == text


@pytest.fixture(scope="module")
def probed(traced):
    """The traced fixture's responses again, with hidden states, and a probe fitted on them."""
    from layerexit.engine.classifier import probe_traces, train_exit_probe

    model, prompts, responses, _ = traced
    traces = record_traces(model, prompts, responses, [1, 2, 3], show_progress=False, keep_hidden=True)
    probe, table = train_exit_probe(traces, min_precision=0.5)
    return model, prompts, responses, probe, probe_traces(probe, traces)


def test_probe_trace_scoring_matches_the_engine_probe_policy(probed):
    model, prompts, responses, probe, ptraces = probed
    thresholds = {l: float(np.quantile(ptraces.conf[:, j], 0.6)) for j, l in enumerate(ptraces.layers[:-1])}
    flops = FlopsModel.from_config(model.config)
    scorer = TraceScorer(ptraces, flops, "propagate", check="probe")
    exit_col, checks = scorer.threshold_exits(thresholds)
    predicted = np.array(scorer.layers)[exit_col]
    assert (predicted < 4).any() and (predicted == 4).any()
    engine = EarlyExitEngine(model, set(), 0)
    cfg = ExitConfig(policy="probe", probe=probe, thresholds=thresholds, kv="recompute")
    same = compared = 0
    for i, prompt in enumerate(prompts):
        r = engine.generate([prompt], cfg, SamplingParams(max_new_tokens=MAX_NEW))[0]
        div = next((k for k, (a, b) in enumerate(zip(r.token_ids, responses[i])) if a != b), len(responses[i]) - 1)
        pred = predicted[ptraces.sequence == i][: div + 1]
        same += int((np.array(r.exit_layers[: div + 1]) == pred).sum())
        compared += div + 1
    # Traces keep hidden states in float16: a probability within ~1e-3 of a threshold may flip, nothing more.
    assert compared >= 20 and same / compared >= 0.95


@pytest.mark.parametrize("kv", ["recompute", "propagate"])
def test_probe_flops_accounting_equals_the_engine(probed, kv):
    """Probe pricing: a probe per checked layer up to the exit, one LM head per token, as the engine counts."""
    model, prompts, _, probe, ptraces = probed
    flops = FlopsModel.from_config(model.config)
    thresholds = {1: float(np.quantile(ptraces.conf[:, 0], 0.5)), 3: float(np.quantile(ptraces.conf[:, 2], 0.3))}
    checked = sorted(thresholds)
    engine = EarlyExitEngine(model, set(), 0)
    early = 0
    for prompt in prompts[:6]:
        r = engine.generate([prompt], ExitConfig(policy="probe", probe=probe, thresholds=thresholds, kv=kv),
                            SamplingParams(max_new_tokens=MAX_NEW))[0]
        n = len(r.token_ids)
        fake = _positions_only_traces(len(prompt), n)
        exits = np.array(r.exit_layers)
        checks = np.array([sum(l <= e for l in checked) + (e == 4) for e in exits])
        scorer = TraceScorer(fake, flops, kv, check="probe")
        assert scorer.flops_of(exits, checks, len(checked)) == pytest.approx(r.flops, rel=1e-12)
        early += int((exits < 4).sum())
    assert early > 0
    # The same exits priced as confidence checks cost more: each check is an LM head there.
    assert TraceScorer(fake, flops, kv).flops_of(exits, checks) > scorer.flops_of(exits, checks, len(checked))


def test_probe_export_is_a_thresholds_file_the_engine_and_serve_load(probed, tmp_path):
    model, _, _, probe, _ = probed
    path = write_thresholds_file(tmp_path / "t.yaml", "tiny", 4, {1: 0.7, 2: 0.6}, "test", probe=probe)
    tf = load_thresholds_file(path)
    assert tf.policy == "probe" and tf.probe is not None and tf.thresholds == {1: 0.7, 2: 0.6}
    block = user_config_block({1: 0.7, 2: 0.6}, "propagate", "probe", path)
    assert block == {"policy": "probe", "thresholds": str(path.resolve()), "kv": "propagate"}
    out = EarlyExitEngine(model, set(), 0).generate([[5, 6, 7]], ExitConfig(**block), SamplingParams(max_new_tokens=4))
    assert len(out[0].token_ids) == 4
    with pytest.raises(ValueError, match="thresholds file"):
        user_config_block({1: 0.7}, "propagate", "probe")
    # No thresholds: the final layer, whatever the policy.
    assert user_config_block({}, "propagate", "probe", path) == {"policy": "final", "kv": "propagate"}


def test_candidate_set_checks_reach_confirmation_and_export():
    """check_vocab in the search config is what confirmation runs and what the exported user_config holds."""
    from layerexit.engine.options import ExitConfig
    from layerexit.serving.config import exit_config_from_user_config
    from layerexit.tuning.confirm import exit_config_for
    from layerexit.tuning.pareto import Point

    cfg = load_config(TuneSearchConfig, REPO / "tune" / "smollm2.yaml", ["check_vocab=64", "search.batch_size=4"])
    assert cfg.check_vocab == 64 and cfg.search.batch_size == 4
    point = Point("t", 0.9, 0.95, {8: 0.9, 20: 0.8}, "trial", {})
    ec = exit_config_for(point, "propagate", check_vocab=cfg.check_vocab)
    assert ExitConfig(**ec).check_vocab == 64
    assert "check_vocab" not in exit_config_for(point, "propagate")
    block = user_config_block(point.thresholds, "propagate", check_vocab=64)
    assert block["check_vocab"] == 64
    assert exit_config_from_user_config(block).check_vocab == 64
    assert user_config_block({}, "propagate", check_vocab=64) == {"policy": "final", "kv": "propagate"}
