"""tracking.tracked_run: runs end with the right status, and a resumed run starts whatever experiment the process
had active before (a notebook, an earlier step on another store)."""

from __future__ import annotations

import mlflow
import pytest

from layerexit import tracking


def test_resume_starts_even_when_another_experiment_is_active(tmp_path):
    uri = f"sqlite:///{tmp_path / 'a.db'}"
    with tracking.tracked_run("exp-a", run_name="first", tracking_uri=uri) as run:
        run.log_metrics({"loss": 1.0}, step=0)
    first = run.run_id
    mlflow.set_experiment("something-else")  # active experiment now differs from the run's
    with tracking.tracked_run("exp-a", tracking_uri=uri, run_id=first) as resumed:
        resumed.log_metrics({"loss": 0.5}, step=1)
    assert resumed.run_id == first
    history = mlflow.MlflowClient().get_metric_history(first, "loss")
    assert [m.value for m in history] == [1.0, 0.5]
    assert mlflow.MlflowClient().get_run(first).info.status == "FINISHED"


def test_an_exception_marks_the_run_failed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'b.db'}"
    with pytest.raises(RuntimeError):
        with tracking.tracked_run("exp-b", tracking_uri=uri) as run:
            raise RuntimeError("boom")
    assert mlflow.MlflowClient().get_run(run.run_id).info.status == "FAILED"
