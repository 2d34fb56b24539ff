"""RunLogger(on_error="warn"), what the training workers log through: an MLflow failure other than a locked SQLite
store is retried, then dropped with a warning, never raised (an outage must not kill training); the default
("raise") still raises. Real MLflow clients against real failures: a run the store does not hold, a server that is
not there."""

from __future__ import annotations

import time

import mlflow
import pytest

from layerexit import tracking
from layerexit.localhost import free_port


def _store_with_run(tmp_path) -> tuple[str, str]:
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    with tracking.tracked_run("exp-degrade", tracking_uri=uri) as run:
        pass
    return uri, run.run_id


def test_default_logger_raises_on_a_store_error(tmp_path):
    uri, _ = _store_with_run(tmp_path)
    with pytest.raises(mlflow.exceptions.MlflowException):
        tracking.RunLogger("0" * 32, uri).log_metrics({"loss": 1.0}, step=1)


def test_warn_logger_retries_then_drops_with_a_warning(tmp_path):
    uri, run_id = _store_with_run(tmp_path)
    logger = tracking.RunLogger("0" * 32, uri, on_error="warn", attempts=3, backoff_s=0.01, pause_s=0.2)
    with pytest.warns(RuntimeWarning, match="failed 3 times"):
        logger.log_metrics({"loss": 1.0}, step=1)
    assert logger.dropped == 1
    assert "MlflowException" in logger.last_error, logger.last_error
    # Within the pause further calls are dropped at once, without trying (no wait on a store that is down).
    start = time.perf_counter()
    logger.set_tags({"a": 1})
    assert logger.dropped == 2 and time.perf_counter() - start < 0.05
    assert logger.log_params({"x": 1}) == {}
    # A logger that works keeps working, and a good call after the pause goes through.
    good = tracking.RunLogger(run_id, uri, on_error="warn")
    good.log_metrics({"loss": 2.0}, step=3)
    assert good.dropped == 0
    assert mlflow.MlflowClient(uri).get_run(run_id).data.metrics["loss"] == 2.0


def test_warn_logger_survives_a_tracking_server_that_is_gone(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    logger = tracking.RunLogger("a" * 32, f"http://127.0.0.1:{free_port()}", on_error="warn", attempts=2,
                                backoff_s=0.01)
    with pytest.warns(RuntimeWarning, match="training goes on"):
        logger.log_metrics({"loss": 1.0}, step=1)
        logger.log_artifact(__file__, "x")
    assert logger.dropped == 2
