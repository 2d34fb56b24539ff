"""MLflow for threshold search, on top of ``layerexit.tracking`` (which owns the tracking URI and run lifecycle).

- ``NestedTrialRuns``: a Ray Tune callback opening one nested MLflow run per trial under the search's parent run,
  logging its thresholds (params) and scores (metrics); a crashed trial's run ends FAILED with the error as a tag.
- ``search_session``: Ray up for a search and its parent MLflow run, the config logged as params.
- ``attach_thresholds_to_model_version``: tag a registered model version with the chosen thresholds and where the
  thresholds file lives, so the version in the registry says which thresholds to serve it with.

Both could move into ``tracking.py`` (they only use MlflowClient).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ray.tune import Callback

from layerexit.tracking import _retry, resolve_tracking_uri

PARENT_TAG = "mlflow.parentRunId"
THRESHOLDS_TAG = "layerexit.thresholds"
THRESHOLDS_RUN_TAG = "layerexit.thresholds_run_id"
THRESHOLDS_ARTIFACT_TAG = "layerexit.thresholds_artifact"


def flatten_params(data: Mapping, prefix: str = "") -> dict[str, Any]:
    """A config dump as MLflow params: nested sections become ``section.key``."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v and all(isinstance(x, str) for x in v):
            out.update(flatten_params(v, key + "."))
        else:
            out[key] = v
    return out


@contextlib.contextmanager
def search_session(cfg, stage: str, run_prefix: str) -> Iterator[Any]:
    """Ray for a search (started here and stopped at the end if nothing was running) and, when
    ``cfg.mlflow.enabled``, the search's parent run with the whole config as params. Yields the run's
    ``RunLogger``, or None without MLflow."""
    import ray

    started_ray = False
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        started_ray = True
    try:
        if not cfg.mlflow.enabled:
            yield None
            return
        from layerexit.tracking import tracked_run

        run_name = cfg.mlflow.run_name or f"{run_prefix}-{Path(cfg.model.spec).name or cfg.model.spec}"
        with tracked_run(cfg.mlflow.experiment, run_name, cfg.mlflow.tracking_uri,
                         tags={"layerexit.stage": stage}) as run:
            run.log_params(flatten_params(cfg.model_dump(mode="json")))
            yield run
    finally:
        if started_ray:
            ray.shutdown()


class NestedTrialRuns(Callback):
    """One nested run per Tune trial; ``describe(config)`` returns the params to log for a trial's config."""

    def __init__(self, parent_run_id: str, tracking_uri: str | None, describe: Callable[[dict], Mapping[str, Any]],
                 metrics: tuple[str, ...] | None = None) -> None:
        self.parent_run_id = parent_run_id
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.describe = describe
        self.metrics = metrics
        self._runs: dict[str, str] = {}
        self._client = None
        self._experiment_id = None

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
            self._experiment_id = self._client.get_run(self.parent_run_id).info.experiment_id
        return self._client

    def _run_for(self, trial) -> str:
        if trial.trial_id not in self._runs:
            client = self.client
            run = _retry(client.create_run, self._experiment_id, run_name=f"trial-{trial.trial_id}",
                         tags={PARENT_TAG: self.parent_run_id, "trial_id": trial.trial_id})
            self._runs[trial.trial_id] = run.info.run_id
            params = {k: str(v) for k, v in self.describe(dict(trial.config)).items()}
            from mlflow.entities import Param

            _retry(client.log_batch, run.info.run_id, params=[Param(k, v) for k, v in params.items()])
        return self._runs[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        self._run_for(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from mlflow.entities import Metric

        run_id = self._run_for(trial)
        ts = int(time.time() * 1000)
        keys = self.metrics or tuple(result)
        items = [Metric(k, float(result[k]), ts, 0) for k in keys
                 if k in result and isinstance(result[k], (int, float)) and not isinstance(result[k], bool)]
        if items:
            _retry(self.client.log_batch, run_id, metrics=items)

    def on_trial_complete(self, iteration, trials, trial, **info):
        _retry(self.client.set_terminated, self._run_for(trial), "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self._run_for(trial)
        _retry(self.client.set_tag, run_id, "error", _trial_error(trial)[:5000])
        _retry(self.client.set_terminated, run_id, "FAILED")


def _trial_error(trial) -> str:
    path = getattr(trial, "error_file", None)
    if path and Path(path).is_file():
        lines = [l for l in Path(path).read_text().strip().splitlines() if l.strip()]
        return lines[-1] if lines else "trial failed"
    return "trial failed"


def attach_thresholds_to_model_version(name: str, version: str, thresholds: Mapping[int, float], run_id: str | None,
                                       artifact_path: str | None, tracking_uri: str | None = None) -> None:
    """Tag registered model ``name`` version ``version`` with the thresholds and the run/artifact holding the file."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    table = json.dumps({str(k): v for k, v in sorted(thresholds.items())})
    _retry(client.set_model_version_tag, name, str(version), THRESHOLDS_TAG, table)
    if run_id:
        _retry(client.set_model_version_tag, name, str(version), THRESHOLDS_RUN_TAG, run_id)
        if artifact_path:
            _retry(client.set_model_version_tag, name, str(version), THRESHOLDS_ARTIFACT_TAG,
                   f"runs:/{run_id}/{artifact_path}")
