"""The draft search end to end on the tiny model: a real local Ray cluster, Ray Tune trials over (layer, k), MLflow
nested runs in a sqlite store, the draft exported and a vLLM Serve config rewritten. vLLM itself is off here
(``confirm.vllm: false``): a random 4-layer model tells nothing about acceptance. The vLLM confirmation runs on
SmolLM2: ``.venv/bin/python jobs/tune_draft.py --config tune/smollm2_draft.yaml`` (about 15 min on 2 busy cores)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from layerexit.config import load_config
from layerexit.tuning.draft_config import DraftTuneConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _config(tiny_dir, tmp_path, *overrides) -> DraftTuneConfig:
    return load_config(DraftTuneConfig, REPO / "tune" / "tiny_draft.yaml",
                       [f"model={tiny_dir}", f"output_dir={tmp_path / 'out'}", *overrides])


def _serve_config(tmp_path) -> Path:
    dst = tmp_path / "smollm2_vllm.yaml"
    dst.write_text((REPO / "serve_configs" / "smollm2_vllm.yaml").read_text())
    return dst


def test_search_picks_exports_and_logs_nested_runs(ray_session, tiny_dir, tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from transformers import AutoModelForCausalLM

    from layerexit.serving.vllm_config import parse_vllm_args
    from layerexit.tuning.draft_search import run_draft_tuning

    monkeypatch.chdir(tmp_path)  # a sqlite store puts artifacts under ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _config(tiny_dir, tmp_path, "mlflow.enabled=true", f"mlflow.tracking_uri={uri}",
                  "space.num_draft=[1,2]")
    serve = _serve_config(tmp_path)
    comments = [l for l in serve.read_text().splitlines() if l.lstrip().startswith("#")]
    outcome = run_draft_tuning(cfg, serve_config=serve)

    assert outcome.exit_code == 0 and not outcome.failed_trials
    assert {(t["layer"], t["num_speculative_tokens"]) for t in outcome.trials} == {(l, k) for l in (1, 2, 3)
                                                                                  for k in (1, 2)}
    best = max(t["predicted_speedup"] for t in outcome.trials)
    assert outcome.chosen["predicted_speedup"] == best
    L, k = outcome.chosen["layer"], outcome.chosen["num_speculative_tokens"]
    for t in outcome.trials:  # every trial measured at its own k (traces), per position and in all
        assert len(t["per_position"]) == t["num_speculative_tokens"] == t["measured_at_k"]
        assert 0 <= t["acceptance"] <= 1 and 0 < t["cost_ratio"] < 1 and t["accepted"] <= t["drafted"]
    assert outcome.heldout["layer"] == L and outcome.heldout["num_draft"] == k  # real decoding, held-out
    # the draft: a plain checkpoint with L layers
    draft_dir = Path(outcome.draft["directory"])
    assert AutoModelForCausalLM.from_pretrained(draft_dir).config.num_hidden_layers == L
    # the Serve config points at it, comments kept, still a valid vLLM config
    data = yaml.safe_load(serve.read_text())
    args = data["applications"][0]["args"]
    assert Path(args["draft"]) == draft_dir.resolve() and args["num_draft"] == k
    assert [l for l in serve.read_text().splitlines() if l.lstrip().startswith("#")] == comments
    parse_vllm_args(args)
    # files
    for key in ("speedup_png", "acceptance_png"):
        assert Path(outcome.files[key]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = yaml.safe_load(Path(outcome.files["summary"]).read_text())
    assert summary["chosen"]["layer"] == L and len(summary["trials"]) == 6 and summary["serve_config_rewritten"]
    # MLflow: a parent run with one FINISHED nested run per trial, the figures and the summary
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.info.run_id == outcome.mlflow_run_id)
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(nested) == 6 and all(r.info.status == "FINISHED" for r in nested)
    assert all({"predicted_speedup", "acceptance", "cost_ratio"} <= set(r.data.metrics) for r in nested)
    assert parent.data.metrics["chosen_layer"] == L and parent.data.metrics["chosen_k"] == k
    names = {a.path for a in client.list_artifacts(parent.info.run_id, "tune-draft")}
    assert {"tune-draft/summary.json", "tune-draft/draft_speedup.png", "tune-draft/trials.csv"} <= names
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "0-overview")] == \
        ["0-overview/draft_speedup.png"]


def test_engine_trials_and_a_draft_that_does_not_pay(ray_session, tiny_dir, tmp_path, capsys):
    """measure: engine decodes in the trial processes; below export.min_speedup the job exits 3, the Serve config
    is left as it was and the draft and the report are still written."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tune_draft_job", REPO / "jobs" / "tune_draft.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    serve = _serve_config(tmp_path)
    before = serve.read_text()
    out = tmp_path / "out"
    rc = job.main(["--config", str(REPO / "tune" / "tiny_draft.yaml"), "--serve-config", str(serve),
                   f"model={tiny_dir}", f"output_dir={out}", "trials.measure=engine", "space.layers=[1,2]",
                   "export.min_speedup=10"])
    assert rc == 3, capsys.readouterr().err
    assert serve.read_text() == before
    summary = yaml.safe_load((out / "summary.json").read_text())
    assert len(summary["trials"]) == 4 and summary["exit_code"] == 3 and not summary["serve_config_rewritten"]
    assert all(t["measured_at_k"] == 2 for t in summary["trials"])  # measured once per layer, at the longest k
    assert any("below export.min_speedup" in n for n in summary["notes"])
    assert (out / f"draft-l{summary['chosen']['layer']}" / "config.json").is_file()
