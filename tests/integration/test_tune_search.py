"""The threshold search end to end on the tiny model, with a real local Ray cluster, Ray Tune and MLflow."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from layerexit.config import load_config
from layerexit.tuning.config import TuneSearchConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_session():
    import ray
    import ray.cloudpickle

    # One declared (fake) GPU lets a test run the model in the GPU actor path on a CPU-only machine.
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    # Hooks defined in this test module travel to the trial workers by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


def _config(tiny_dir, tmp_path, *overrides) -> TuneSearchConfig:
    return load_config(TuneSearchConfig, REPO / "tune" / "tiny.yaml",
                       [f"model={tiny_dir}", f"output_dir={tmp_path / 'out'}", *overrides])


def _serve_config(tmp_path) -> Path:
    src = REPO / "serve_configs" / "smollm2.yaml"
    if not src.is_file():
        src = REPO / "serve_configs" / "7b_exits.yaml"
    dst = tmp_path / "serve.yaml"
    dst.write_text(src.read_text())
    return dst


def _user_config(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    app = next(a for a in data["applications"] if a["import_path"].startswith("layerexit.serving"))
    return next(d for d in app["deployments"] if d["name"] == "EarlyExitLLM")["user_config"]


def test_search_finishes_writes_front_and_export_and_logs_nested_runs(ray_session, tiny_dir, tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from ray.serve.schema import ServeDeploySchema

    from layerexit.engine.options import ExitConfig
    from layerexit.engine.thresholds import load_thresholds_file
    from layerexit.serving.config import exit_config_from_user_config
    from layerexit.tuning.search import run_tuning

    monkeypatch.chdir(tmp_path)  # a sqlite store puts artifacts under ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _config(tiny_dir, tmp_path, "mlflow.enabled=true", f"mlflow.tracking_uri={uri}")
    serve = _serve_config(tmp_path)
    comments = [l for l in serve.read_text().splitlines() if l.lstrip().startswith("#")]
    outcome = run_tuning(cfg, serve_config=serve)

    assert outcome.constraint_met and outcome.exit_code == 0
    assert len(outcome.trials) == cfg.search.num_trials and not outcome.failed_trials
    # The front holds trials and, unless a trial dominates it, the final layer (ratio 1, quality 1).
    assert outcome.front and all(p in outcome.trials or p.kind == "final" for p in outcome.front)
    assert any(p.kind == "trial" for p in outcome.front)
    png = Path(outcome.files["pareto_png"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert {"paper-7b", "adainfer-classifier", "final"} <= {p.name for p in outcome.references}
    # Confirmed numbers come from real generation; with exact KV they match the traces' FLOPs estimate closely.
    tuned = [c for c in outcome.confirmed if c.kind != "final"]
    assert tuned and all(c.extra["scored_on"] == "generation" and 0 < c.flops_ratio for c in tuned)
    assert {p.name for p in outcome.report} >= {"tuned", "paper-7b", "adainfer-classifier", "final"}

    # Export: thresholds file, user_config block, Serve config rewritten in place and still a valid Serve config.
    thr = load_thresholds_file(outcome.files["thresholds"])
    assert thr.thresholds == outcome.thresholds and thr.num_layers == 4
    ExitConfig(policy="confidence", thresholds=outcome.files["thresholds"]).build_policy(4)
    uc = _user_config(serve)
    assert uc == outcome.user_config
    assert exit_config_from_user_config(uc).resolved_thresholds(4)[0] == outcome.thresholds
    ServeDeploySchema.model_validate(yaml.safe_load(serve.read_text()))
    after = serve.read_text().splitlines()
    assert all(c in after for c in comments)

    # MLflow: parent run with artifacts, one nested FINISHED run per trial.
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(outcome.mlflow_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["constraint_met"] == "true"
    names = {a.path for a in client.list_artifacts(parent.info.run_id, "tune")}
    assert "tune/pareto.png" in names and "tune/report.md" in names
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "thresholds")] == ["thresholds/thresholds.yaml"]
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == cfg.search.num_trials
    assert {r.info.status for r in children} == {"FINISHED"}
    assert all("flops_ratio" in r.data.metrics and "thresholds" in r.data.params for r in children)


def _crash_on_high_first_threshold(thresholds):
    if thresholds.get(1, 0.0) > 0.02:
        raise RuntimeError("injected trial crash")


def test_a_crashing_trial_is_marked_failed_and_the_search_goes_on(ray_session, tiny_dir, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from layerexit.tuning.search import run_tuning

    monkeypatch.chdir(tmp_path)  # a sqlite store puts artifacts under ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _config(tiny_dir, tmp_path, "search.algorithm=random", "search.num_trials=10", "reference.classifier=false",
                  "prompts.report.limit=0", "mlflow.enabled=true", f"mlflow.tracking_uri={uri}")
    outcome = run_tuning(cfg, before_trial=_crash_on_high_first_threshold)
    assert outcome.failed_trials and outcome.trials
    assert len(outcome.failed_trials) + len(outcome.trials) == 10
    assert all(f["thresholds"][1] > 0.02 and "injected trial crash" in f["error"] for f in outcome.failed_trials)
    assert all(t.thresholds[1] <= 0.02 for t in outcome.trials)
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(outcome.mlflow_run_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    failed = [r for r in children if r.info.status == "FAILED"]
    assert len(failed) == len(outcome.failed_trials)
    assert all("injected trial crash" in r.data.tags.get("error", "") for r in failed)
    assert parent.info.status == "FINISHED"


def test_probe_search_exports_a_probe_the_serve_config_can_load(ray_session, tiny_dir, tmp_path):
    """policy: probe fits a probe on the validation traces, searches thresholds over its probabilities (checks
    priced as probes, one head per token), confirms with the engine's probe policy and exports the probe."""
    from layerexit.engine.thresholds import load_thresholds_file
    from layerexit.serving.config import exit_config_from_user_config
    from layerexit.tuning.search import run_tuning

    cfg = _config(tiny_dir, tmp_path, "policy=probe", "kv=propagate", "space.threshold_range=[0.05,0.95]",
                  "reference.classifier=false")
    serve = _serve_config(tmp_path)
    outcome = run_tuning(cfg, serve_config=serve)
    assert outcome.constraint_met and len(outcome.trials) == cfg.search.num_trials
    assert all(p.extra["policy"] == "probe" for p in outcome.trials)
    confirmed = [c for c in outcome.confirmed if c.kind != "final"]
    assert confirmed and all(c.extra["policy"] == "probe" for c in confirmed)
    # Probe checks are cheap: a tuned probe rule that exits early costs less than the final layer.
    assert outcome.chosen.kind != "final" and outcome.chosen.flops_ratio < 1.0
    thr = load_thresholds_file(outcome.files["thresholds"])
    assert thr.policy == "probe" and thr.probe is not None and thr.thresholds == outcome.thresholds
    uc = _user_config(serve)
    assert uc == outcome.user_config and uc["policy"] == "probe"
    assert exit_config_from_user_config(uc).build_policy(4).name == "probe"
    tuned = next(p for p in outcome.report if p.name == "tuned")
    assert tuned.extra["policy"] == "probe" and tuned.flops_ratio < 1.0


def test_grid_search_covers_the_grid_with_the_model_in_a_gpu_actor(ray_session, tiny_dir, tmp_path):
    from layerexit.tuning.search import run_tuning
    from layerexit.tuning.space import ThresholdSpace

    # model.num_gpus > 0: traces and confirmation run in a Ray actor holding the (declared) GPU; on this CPU-only
    # machine torch falls back to the CPU inside it, which is enough to check the plumbing.
    cfg = _config(tiny_dir, tmp_path, "search.algorithm=grid", "search.grid_points=3", "search.num_trials=10",
                  "confirm.top_k=1", "prompts.report.limit=0", "reference.classifier=false", "num_gpus=1",
                  "search.trial_cpus=0.5")
    outcome = run_tuning(cfg)
    assert any(c.extra["scored_on"] == "generation" for c in outcome.confirmed)
    grid = ThresholdSpace.from_settings(cfg.space).grid(3)
    assert len(grid) == 10
    assert sorted(sorted(t.thresholds.items()) for t in outcome.trials) == sorted(sorted(g.items()) for g in grid)


def test_unreachable_minimum_quality_exits_non_zero_and_leaves_serve_config(ray_session, tiny_dir, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("tune_thresholds_job", REPO / "jobs" / "tune_thresholds.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    serve = _serve_config(tmp_path)
    before = serve.read_text()
    # Every threshold below every recorded confidence: each token exits at layer 1, far from the final layer.
    rc = job.main(["--config", str(REPO / "tune" / "tiny.yaml"), "--serve-config", str(serve),
                   f"model={tiny_dir}", f"output_dir={tmp_path / 'out'}", "space.threshold_range=[0.0,0.004]",
                   "quality.min=0.99", "quality.min_trace_agreement=0", "prompts.report.limit=0"])
    err = capsys.readouterr().err
    assert rc == 3
    assert "not met" in err
    assert serve.read_text() == before
    summary = yaml.safe_load((tmp_path / "out" / "summary.json").read_text())
    assert summary["constraint_met"] is False and summary["best_tuned"]["quality"] < 0.99
    assert "NOT met" in (tmp_path / "out" / "report.md").read_text()


def test_demo_stage_returns_a_servable_user_config(ray_session, tiny_dir, tmp_path):
    from rich.console import Console

    from layerexit.serving.config import exit_config_from_user_config
    from layerexit.tuning.demo_stage import run_demo_tuning

    result = run_demo_tuning(Console(quiet=True), str(tiny_dir), tmp_path / "demo", num_trials=3,
                             validation_prompts=3, max_new_tokens=6, quality_metric="agreement", min_quality=0.5,
                             mlflow=False)
    assert result["constraint_met"] is True
    assert Path(result["files"]["pareto_png"]).is_file() and Path(result["files"]["thresholds"]).is_file()
    policy = exit_config_from_user_config(result["user_config"]).build_policy(4)
    # The tiny model's confidences (~0.01-0.04) never reach the demo's 0.5+ thresholds: no set can save FLOPs,
    # so the demo serves the full model rather than thresholds that only add LM-head checks.
    assert result["user_config"]["policy"] == "final" and result["thresholds"] == {}
    assert policy.name == "final"
