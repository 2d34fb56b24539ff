"""What a model's training run recorded about it: where it was trained (the device and dtype ``layerexit
export-draft`` loads it with, and measures the draft's agreement in, unless ``--device`` / ``--dtype`` say otherwise)
and which exit layers it was trained with (``trained_exit_layers``: the threshold search's exits unless its config
lists them).

Read from the training run that produced the model, as ``jobs/train_lite.py`` records it:

- an MLflow model URI (``models:/name@alias``, ``models:/name/3``, ``runs:/<id>/...``): the source run of the
  registered version: param ``scaling.use_gpu`` and tag ``layerexit.precision`` (the resolved training precision;
  param ``derived.precision`` in older runs, else param ``deepspeed.precision``);
- a checkpoint's ``hf_model`` directory: ``layerexit_mlflow.json``, which the job writes beside its checkpoints
  (``<storage>/<name>/``) with the config it ran with.

Anything else (the embedded model, a hub id, a directory from elsewhere, an unreachable MLflow) is unknown:
``cpu`` + ``float32``, and the note says so. Training precisions map to the dtype the weights were held in:
``bf16`` -> ``bfloat16``; ``fp32`` and ``autocast_bf16`` (fp32 weights, bf16 compute on a CPU) -> ``float32``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

RUN_INFO_FILE = "layerexit_mlflow.json"  # training.ray_trainer.RUN_INFO_FILE (not imported: that module needs Ray)
PRECISION_DTYPES = {"bf16": "bfloat16", "fp32": "float32", "autocast_bf16": "float32"}
DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Placement:
    """A device and dtype to load a model with, and where they came from (one line for the user)."""

    device: str
    dtype: str
    source: str
    known: bool = True


UNKNOWN = Placement("cpu", "float32", "", known=False)


def _from_settings(use_gpu: str | bool | None, precision: str | None, source: str) -> Placement | None:
    """A placement from a run's ``scaling.use_gpu`` and training precision (both as MLflow stores them: strings)."""
    if use_gpu is None:
        return None
    gpu = use_gpu if isinstance(use_gpu, bool) else str(use_gpu).strip().lower() == "true"
    if precision in (None, "auto"):  # what training_precision resolves auto to: bf16 weights on a GPU
        precision = "bf16" if gpu else "fp32"
    dtype = PRECISION_DTYPES.get(str(precision))
    if dtype is None:
        return None
    return Placement("cuda" if gpu else "cpu", dtype, f"{source}: scaling.use_gpu={gpu}, precision {precision}")


def _run_id_of(uri: str) -> str | None:
    """The MLflow run that produced ``uri`` (the registered version's source run, or the run of a runs:/ URI)."""
    from mlflow import MlflowClient

    from layerexit.models.mlflow_source import _registered_version

    if uri.startswith("runs:/"):
        return uri[len("runs:/"):].split("/", 1)[0] or None
    resolved = _registered_version(uri)
    if resolved is None:
        return None
    return MlflowClient().get_model_version(*resolved).run_id


def from_mlflow(uri: str) -> Placement | None:
    """The placement recorded by the training run behind an MLflow model URI; None when it holds none."""
    from mlflow import MlflowClient

    from layerexit.tracking import setup_tracking

    setup_tracking()
    run_id = _run_id_of(uri)
    if not run_id:
        return None
    data = MlflowClient().get_run(run_id).data
    precision = (data.tags.get("layerexit.precision") or data.params.get("derived.precision")
                 or data.params.get("deepspeed.precision"))
    return _from_settings(data.params.get("scaling.use_gpu"), precision, f"training run {run_id}")


def from_checkpoint_dir(directory: str | Path) -> Placement | None:
    """The placement in the ``layerexit_mlflow.json`` of the training job whose checkpoint holds ``directory``."""
    directory = Path(directory).expanduser().resolve()
    for parent in (directory.parent, directory.parent.parent):  # <storage>/<name>/checkpoint_N/hf_model
        info = parent / RUN_INFO_FILE
        if info.is_file():
            try:
                config = json.loads(info.read_text()).get("config") or {}
            except (OSError, json.JSONDecodeError):
                return None
            return _from_settings(config.get("scaling.use_gpu"), config.get("deepspeed.precision"), str(info))
    return None


def trained_placement(spec: str) -> Placement:
    """Where ``spec`` was trained, or :data:`UNKNOWN` (cpu, float32) when nothing records it."""
    from layerexit.models.mlflow_source import is_mlflow_uri

    try:
        found = from_mlflow(spec) if is_mlflow_uri(spec) else (
            from_checkpoint_dir(spec) if Path(spec).expanduser().is_dir() else None)
    except Exception:  # noqa: BLE001 - MLflow unreachable or the run gone: the default applies, the note says so
        found = None
    return found or UNKNOWN


def choose_placement(spec: str, device: str | None, dtype: str | None) -> tuple[Placement, str]:
    """``--device`` / ``--dtype`` where given, else where ``spec`` was trained; returns the placement and a note.

    A ConfigError names ``--device`` or ``--dtype`` for a value that is not supported and for cuda where torch sees
    no CUDA device.
    """
    from layerexit.errors import ConfigError

    if device is not None and device.split(":", 1)[0] not in DEVICES:
        raise ConfigError(f"--device {device!r} is not supported", "use cpu or cuda (cuda:N for another GPU)")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not supported", f"use one of {', '.join(DTYPES)}")
    trained = trained_placement(spec) if device is None or dtype is None else UNKNOWN
    chosen = Placement(device or trained.device, dtype or trained.dtype, trained.source, trained.known)
    if chosen.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            why = "" if device is not None else f" (the model was trained on a GPU: {trained.source})"
            raise ConfigError(f"--device {chosen.device}: torch sees no CUDA device here{why}",
                              "run it on a GPU machine, or pass --device cpu (a 7B model in float32 needs ~27 GB "
                              "of memory)")
    default = "as trained" if trained.known else "default"
    note = (f"device {chosen.device} ({'--device' if device else default}), "
            f"dtype {chosen.dtype} ({'--dtype' if dtype else default})")
    if device is None or dtype is None:
        note += (f"; trained as recorded by {trained.source}" if trained.known else
                 f"; where {spec} was trained is not recorded (no layerexit training run behind it), so the default "
                 "is cpu + float32: pass --device/--dtype to choose")
    return chosen, note


# ------------------------------------------------------------------------------------------ exit layers
def _layers(value) -> list[int] | None:
    """``lite.exit_layers`` as MLflow stores it (the string "[8, 12]") or as a config holds it (a list)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return sorted(value)
    return None


def _adapter_layers(directory: Path) -> list[int] | None:
    from layerexit.models.adapters import ADAPTERS_DIR, META_FILE

    meta = directory / ADAPTERS_DIR / META_FILE
    if not meta.is_file():
        return None
    try:
        return _layers(json.loads(meta.read_text()).get("layers"))
    except (OSError, json.JSONDecodeError):
        return None


def trained_exit_layers(spec: str) -> tuple[list[int], str] | None:
    """The exit layers ``spec`` was trained with, and where that was read: the exit adapters it ships
    (``exit_adapters/adapters.json``), else the ``lite.exit_layers`` its training run recorded (the MLflow source run
    of a registered version, or the ``layerexit_mlflow.json`` beside a checkpoint). None when nothing records them
    (the embedded model, a hub id, a directory from elsewhere)."""
    from layerexit.models.mlflow_source import download_mlflow_model, is_mlflow_uri

    if is_mlflow_uri(spec):
        from mlflow import MlflowClient

        from layerexit.tracking import setup_tracking

        local, _ = download_mlflow_model(spec)
        found = _adapter_layers(Path(local))
        if found:
            return found, f"{spec}: its exit adapters"
        setup_tracking()
        run_id = _run_id_of(spec)
        layers = _layers(MlflowClient().get_run(run_id).data.params.get("lite.exit_layers")) if run_id else None
        return (layers, f"{spec}: its training run {run_id} (lite.exit_layers)") if layers else None
    directory = Path(spec).expanduser()
    if not directory.is_dir():
        return None
    found = _adapter_layers(directory)
    if found:
        return found, f"{directory}: its exit adapters"
    for parent in (directory.resolve().parent, directory.resolve().parent.parent):
        info = parent / RUN_INFO_FILE
        if info.is_file():
            try:
                layers = _layers((json.loads(info.read_text()).get("config") or {}).get("lite.exit_layers"))
            except (OSError, json.JSONDecodeError):
                return None
            return (layers, f"{info} (lite.exit_layers)") if layers else None
    return None
