"""The MLflow story in a real browser: the demo's evaluation stage logs its run (nested per configuration) into a
store, `mlflow server` serves it, headless Chromium renders the experiment list and the run, and the screenshots
are real pictures (not blank pages). `make test` installs Chromium first (`make browser`: Debian's `chromium` and
`chromium-driver`), so there it runs; a bare `pytest` on a machine without Chromium skips, with the reason."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_eval_run_in_the_mlflow_ui(tmp_path, tiny_dir, tiny_model_and_tokenizer, monkeypatch) -> None:
    from mlflow import MlflowClient
    from PIL import Image
    from rich.console import Console

    from layerexit.engine.options import ExitConfig
    from layerexit.evaluation.demo_stage import run_demo_eval
    from layerexit.evaluation.mlflow_ui import capture, find_chromium

    chromium = find_chromium()
    if chromium is None:
        pytest.skip("Chromium is not installed (`make browser` installs it); the MLflow UI check needs a browser")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)  # the default artifact root (./mlruns) lands in tmp
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    result = run_demo_eval(Console(width=160), str(tiny_dir),
                           {"final": ExitConfig(policy="final"),
                            "lite": ExitConfig(policy="confidence", thresholds={1: 0.0, 2: 0.5})},
                           tmp_path / "eval", limit=2, max_new_tokens=3, alignment=True,
                           model_and_tokenizer=tiny_model_and_tokenizer, mlflow=True, show_progress=False)
    client = MlflowClient(tracking_uri=store)
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.info.run_name == "demo-eval"
    assert client.get_experiment(parent.info.experiment_id).name == "layerexit-demo"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == ["final", "lite"]
    layer_metrics = sorted(k for k in parent.data.metrics if k.startswith("alignment/"))
    assert layer_metrics and all(k.rsplit("/", 1)[1].startswith("layer_0") for k in layer_metrics)
    assert client.list_artifacts(parent.info.run_id)[0].path == "0-overview"  # the UI lists it first
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "0-overview")] == [
        "0-overview/cost_quality.png"]

    shots = capture(store, tmp_path / "shots", chromium=chromium, log_dir=tmp_path)
    for name, png in shots.items():
        img = Image.open(png).convert("RGB")
        colours = img.getcolors(maxcolors=1 << 16)
        # a rendered page has text and widgets: many colours; a blank or error page has a handful
        assert img.width >= 600 and (colours is None or len(colours) > 20), (name, len(colours or []))
