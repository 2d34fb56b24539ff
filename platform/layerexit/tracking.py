"""The one module that talks to MLflow.

Tracking URI: the value passed in (from a config), else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the
current working directory (made absolute, so Ray workers started elsewhere write to the same store).

- ``tracked_run(...)``: a context manager around one run; an exception ends it FAILED (KILLED on Ctrl-C/SIGTERM).
- ``RunLogger``: log into an existing run from another process (e.g. the rank-0 Ray Train worker).
- ``log_hf_model(...)``: log a Hugging Face model directory as a pyfunc model, register it, set an alias.
- ``hf_dir_from_model_uri(...)``: the plain HF directory behind ``models:/name@alias`` or ``runs:/...``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

HF_ARTIFACT_KEY = "hf_model"
_MAX_PARAM_LEN = 6000


def resolve_tracking_uri(configured: str | None = None) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db; relative sqlite paths made absolute."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri[len("sqlite:///"):]
        uri = "sqlite:///" + str(Path(rel).expanduser().resolve())
    elif "://" not in uri and not uri.startswith(("databricks", "file:")):
        uri = str(Path(uri).expanduser().resolve())  # a plain directory: the file store
    return uri


FILE_SCHEMES = ("sqlite", "file")
KNOWN_SCHEMES = ("http", "https", "sqlite", "file", "databricks", "databricks-uc", "postgresql", "mysql", "mssql")


def is_file_based_uri(uri: str) -> bool:
    """True for stores that live on one machine's disk: ``sqlite:///...``, ``file:...`` and plain paths."""
    if uri.startswith("databricks"):
        return False
    if "://" not in uri and not uri.startswith("file:"):
        return True  # a plain directory: MLflow's file store
    return uri.split(":", 1)[0].lower().split("+")[0] in FILE_SCHEMES


def check_tracking_uri(uri: str | None, field: str = "mlflow.tracking_uri") -> None:
    """Reject a tracking URI whose scheme MLflow does not know (``htp://``, ``sqllite:///``), naming ``field``."""
    from layerexit.errors import ConfigError

    if uri is None or "://" not in uri:
        return  # unset (environment/default) or a plain path: the file store
    scheme = uri.split("://", 1)[0].lower().split("+")[0]
    if scheme not in KNOWN_SCHEMES:
        raise ConfigError(f"{field}: unknown scheme {scheme!r} in {uri}",
                          "use http(s)://host:port for an MLflow server, sqlite:///path/mlflow.db for a local file, "
                          "or a database URI (postgresql://, mysql://)")


def setup_tracking(configured: str | None = None) -> str:
    """Point the MLflow client at the resolved URI and return it."""
    import mlflow

    uri = resolve_tracking_uri(configured)
    mlflow.set_tracking_uri(uri)
    return uri


def _retry(fn, *args, attempts: int = 5, **kwargs):
    """SQLite stores can be briefly locked when two processes write; retry a few times."""
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001
            if "locked" not in str(err).lower() or i == attempts - 1:
                raise
            time.sleep(0.2 * (i + 1))
    return None


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:_MAX_PARAM_LEN]


class RunLogger:
    """Logs into one existing run by id (works from any process that can reach the tracking store).

    ``on_error="raise"`` (default): a failure other than a briefly locked SQLite store raises. ``on_error="warn"``
    (the training workers): every call is tried ``attempts`` times with exponential backoff, then dropped with a
    warning instead of raising, so an MLflow outage never kills training; after a drop, calls in the next
    ``pause_s`` seconds are dropped at once (counted in ``dropped``) rather than each waiting out its retries, then
    logging is tried again.
    """

    def __init__(self, run_id: str, tracking_uri: str | None = None, *, on_error: str = "raise", attempts: int = 4,
                 backoff_s: float = 0.5, pause_s: float = 60.0) -> None:
        from mlflow import MlflowClient

        if on_error not in ("raise", "warn"):
            raise ValueError(f"on_error must be 'raise' or 'warn', not {on_error!r}")
        self.run_id = run_id
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self.on_error, self.attempts, self.backoff_s, self.pause_s = on_error, attempts, backoff_s, pause_s
        self.dropped = 0
        self.last_error: str | None = None
        self._paused_until = 0.0

    def _call(self, fn, *args, **kwargs):
        if self.on_error == "raise":
            return _retry(fn, *args, **kwargs)
        if time.monotonic() < self._paused_until:
            self.dropped += 1
            return None
        for i in range(self.attempts):
            try:
                result = fn(*args, **kwargs)
                self._paused_until = 0.0
                return result
            except Exception as err:  # noqa: BLE001 - any store error: retry, then degrade (never kill training)
                self.last_error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
                if i < self.attempts - 1:
                    time.sleep(self.backoff_s * 2**i)
        self.dropped += 1
        self._paused_until = time.monotonic() + self.pause_s
        import warnings

        warnings.warn(f"MLflow logging to {self.tracking_uri} failed {self.attempts} times ({self.last_error}); "
                      f"dropped this call and any in the next {self.pause_s:.0f} s, training goes on "
                      f"({self.dropped} dropped so far)", RuntimeWarning, stacklevel=3)
        return None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), 900):
            self._call(self.client.log_batch, self.run_id, metrics=items[i : i + 900])

    def log_params(self, params: Mapping[str, Any]) -> dict[str, str]:
        """Log params; a param already logged with another value (a resumed run with a changed config) is kept
        and the new value recorded as tag ``changed_param.<key>``. Returns the changed ones."""
        from mlflow.entities import Param, RunTag

        run = self._call(self.client.get_run, self.run_id)
        if run is None:  # degraded (on_error="warn"): nothing to compare against, so nothing is logged
            return {}
        existing = run.data.params
        new, changed = [], {}
        for k, v in params.items():
            val = _param_value(v)
            if k not in existing:
                new.append(Param(k, val))
            elif existing[k] != val:
                changed[k] = val
        for i in range(0, len(new), 100):
            self._call(self.client.log_batch, self.run_id, params=new[i : i + 100])
        if changed:
            tags = [RunTag(f"changed_param.{k}", v) for k, v in changed.items()]
            self._call(self.client.log_batch, self.run_id, tags=tags)
        return changed

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._call(self.client.log_batch, self.run_id, tags=[RunTag(k, _param_value(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        self._call(self.client.log_artifacts, self.run_id, str(directory), artifact_path)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self._call(self.client.log_dict, self.run_id, obj, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call(self.client.log_text, self.run_id, text, artifact_file)


def get_or_create_experiment(name: str) -> str:
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    return exp.experiment_id if exp is not None else mlflow.create_experiment(name)


def run_exists(run_id: str) -> bool:
    import mlflow

    try:
        mlflow.get_run(run_id)
        return True
    except Exception:  # noqa: BLE001 - MlflowException for a run this store does not know
        return False


@contextlib.contextmanager
def tracked_run(
    experiment: str,
    run_name: str | None = None,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    log_system_metrics: bool = False,
) -> Iterator[RunLogger]:
    """Start (or resume, with ``run_id``) a run; end it FINISHED, FAILED on an exception, KILLED on interrupt."""
    import mlflow

    uri = setup_tracking(tracking_uri)
    exp_id = get_or_create_experiment(experiment)
    if run_id is not None and not run_exists(run_id):
        run_id = None
    kwargs: dict[str, Any] = {"log_system_metrics": log_system_metrics or None}
    if run_id is not None:
        # A resumed run lives in its own experiment; an experiment made active earlier in this process (a
        # notebook, a previous job step on another store) would make start_run refuse it.
        mlflow.set_experiment(experiment_id=mlflow.MlflowClient().get_run(run_id).info.experiment_id)
        run = mlflow.start_run(run_id=run_id, **kwargs)
    else:
        run = mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=dict(tags or {}), **kwargs)
    status = "FAILED"
    try:
        yield RunLogger(run.info.run_id, uri)
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    finally:
        mlflow.end_run(status=status)


def _pyfunc_class():
    import mlflow.pyfunc

    class HFCausalLMModel(mlflow.pyfunc.PythonModel):
        """Greedy text generation from the logged Hugging Face directory (``artifacts/hf_model``).

        ``predict`` takes a list of prompts (or a DataFrame with a ``prompt`` column) and returns completions.
        The directory itself is a plain transformers checkpoint: ``hf_dir_from_model_uri`` returns it.
        """

        def load_context(self, context):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            path = context.artifacts[HF_ARTIFACT_KEY]
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForCausalLM.from_pretrained(path).eval()

        def predict(self, context, model_input, params=None):
            import torch

            prompts = list(model_input["prompt"]) if hasattr(model_input, "columns") else list(model_input)
            max_new = int((params or {}).get("max_new_tokens", 64))
            outs = []
            for p in prompts:
                ids = self.tokenizer(p, return_tensors="pt")
                with torch.inference_mode():
                    gen = self.model.generate(**ids, max_new_tokens=max_new, do_sample=False)
                outs.append(self.tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
            return outs

    return HFCausalLMModel


def log_hf_model(
    hf_dir: str | Path,
    registered_name: str | None = None,
    alias: str | None = None,
    name: str = "model",
) -> dict[str, Any]:
    """Log ``hf_dir`` into the active run as a pyfunc model; register it and set ``alias`` when given.

    Returns ``{"model_uri", "version", "registered_name", "alias"}``.
    """
    import mlflow

    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=_pyfunc_class()(),
        artifacts={HF_ARTIFACT_KEY: str(hf_dir)},
        registered_model_name=registered_name,
        pip_requirements=["torch", "transformers", "safetensors"],
    )
    version = getattr(info, "registered_model_version", None)
    if registered_name and version is not None and alias:
        mlflow.MlflowClient().set_registered_model_alias(registered_name, alias, str(version))
    return {"model_uri": info.model_uri, "version": version, "registered_name": registered_name, "alias": alias}


def hf_dir_from_model_uri(uri: str, dst: str | Path | None = None) -> Path:
    """Download a model logged by ``log_hf_model`` (``models:/name@alias``, ``models:/name/3``, ``runs:/id/model``)
    and return its plain Hugging Face directory."""
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(dst) if dst else None))
    for candidate in (local / "artifacts" / HF_ARTIFACT_KEY, local / HF_ARTIFACT_KEY, local):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(f"{uri} holds no Hugging Face model directory (looked under {local})")
