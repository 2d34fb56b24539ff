"""Where a served model comes from: the specs ``load_model_and_tokenizer`` accepts, plus MLflow model URIs.

``models:/name@alias`` and ``models:/name/<version>`` are resolved to a version and downloaded once per
(name, version) into ``$LAYEREXIT_HOME/mlflow/``; ``runs:/...`` URIs are downloaded once per URI. The download
is the plain Hugging Face directory ``layerexit.tracking.log_hf_model`` logged, so the rest of the loading path
is the local-directory one. A thresholds file shipped next to the weights (``thresholds.yaml``/``.json``) is
found too, so ``user_config: {thresholds: thresholds.yaml}`` can name it relative to the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The MLflow download lives with model loading (models/ imports nothing from serving/).
from layerexit.models.mlflow_source import download_mlflow_model, is_mlflow_uri

THRESHOLDS_NAMES = ("thresholds.yaml", "thresholds.yml", "thresholds.json")


@dataclass(frozen=True)
class ModelSource:
    """A spec ready for ``load_model_and_tokenizer`` and, when there is one, the local directory behind it."""

    spec: str  # what the user configured
    load_spec: str  # what load_model_and_tokenizer receives
    local_dir: Path | None  # directory with the weights (for thresholds files shipped with the model)
    version: str | None = None  # MLflow registered model version


def resolve_model_source(spec: str, tracking_uri: str | None = None,
                         cache_root: str | Path | None = None) -> ModelSource:
    """Turn a ``model`` arg into something ``load_model_and_tokenizer`` accepts (downloading MLflow models)."""
    if is_mlflow_uri(spec):
        hf_dir, version = download_mlflow_model(spec, cache_root, tracking_uri)
        return ModelSource(spec, str(hf_dir), hf_dir, version)
    path = Path(spec).expanduser()
    return ModelSource(spec, spec, path if path.is_dir() else None)


def find_thresholds_file(model_dir: str | Path | None) -> Path | None:
    """A thresholds file shipped with the model (in its directory or the directory above), if any."""
    if model_dir is None:
        return None
    base = Path(model_dir)
    for folder in (base, base.parent):
        for name in THRESHOLDS_NAMES:
            if (folder / name).is_file():
                return folder / name
    return None
