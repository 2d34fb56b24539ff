"""MLflow model URIs (``models:/name@alias``, ``models:/name/<version>``, ``runs:/...``) as model specs.

Resolved to a version and downloaded once per (name, version) into ``$LAYEREXIT_HOME/mlflow/``; ``runs:/``
URIs once per URI. The download is the plain Hugging Face directory ``layerexit.tracking.log_hf_model``
logged. Lives under ``models/`` because model loading needs it; serving re-exports it (``models/`` imports
nothing from ``serving/``).
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

from layerexit.errors import ModelSpecError
from layerexit.home import layerexit_home

MLFLOW_SCHEMES = ("models:/", "runs:/")
_COMPLETE = ".layerexit-complete"


def is_mlflow_uri(spec: str) -> bool:
    return spec.startswith(MLFLOW_SCHEMES)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:80]


def _registered_version(uri: str) -> tuple[str, str] | None:
    """(name, version) for models:/name@alias or models:/name/<version>; None for other URIs."""
    from mlflow import MlflowClient

    rest = uri[len("models:/"):] if uri.startswith("models:/") else None
    if rest is None:
        return None
    client = MlflowClient()
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            return name, str(client.get_model_version_by_alias(name, alias).version)
        name, _, ref = rest.partition("/")
        if ref.isdigit():
            return name, ref
        if ref.lower() == "latest" or ref == "":
            versions = client.search_model_versions(f"name='{name}'")
            if versions:
                return name, str(max(int(v.version) for v in versions))
    except Exception as err:  # noqa: BLE001 - MlflowException (not found, store unreachable)
        raise ModelSpecError(f"MLflow cannot resolve {uri}: {str(err).splitlines()[0]}",
                             "check the registered name/alias and MLFLOW_TRACKING_URI") from None
    return None


def download_mlflow_model(uri: str, cache_root: str | Path | None = None,
                          tracking_uri: str | None = None) -> tuple[Path, str | None]:
    """Download the HF directory behind an MLflow model URI (cached) and return (directory, version)."""
    from layerexit.tracking import hf_dir_from_model_uri, setup_tracking

    setup_tracking(tracking_uri)
    root = Path(cache_root) if cache_root else layerexit_home() / "mlflow"
    resolved = _registered_version(uri)
    if resolved is not None:
        name, version = resolved
        key, fetch_uri = f"{_safe(name)}-v{version}", f"models:/{name}/{version}"
    else:
        version = None
        key = f"{_safe(uri)}-{hashlib.sha1(uri.encode()).hexdigest()[:10]}"
        fetch_uri = uri
    target = root / key
    marker = target / _COMPLETE
    if marker.is_file():
        return Path(marker.read_text().strip()), version
    if target.exists():
        shutil.rmtree(target)  # an interrupted download
    target.mkdir(parents=True)
    try:
        hf_dir = hf_dir_from_model_uri(fetch_uri, dst=target)
    except FileNotFoundError as err:
        hf_dir = _hf_dir_in_download(target)
        if hf_dir is None:
            raise ModelSpecError(str(err), "log the model with layerexit.tracking.log_hf_model") from None
    except Exception as err:  # noqa: BLE001 - MlflowException, connection errors
        shutil.rmtree(target, ignore_errors=True)
        raise ModelSpecError(f"could not download {uri} from MLflow: {str(err).splitlines()[0]}",
                             "check MLFLOW_TRACKING_URI and that the model version exists") from None
    marker.write_text(str(hf_dir))
    return hf_dir, version


def _hf_dir_in_download(root: Path) -> Path | None:
    """The HF directory in a downloaded pyfunc model: MLmodel's ``artifacts.hf_model.path`` (MLflow keeps the
    logged directory's own name, e.g. ``artifacts/<dirname>``), else the shallowest folder with config.json."""
    import yaml

    mlmodel = root / "MLmodel"
    if mlmodel.is_file():
        try:
            meta = yaml.safe_load(mlmodel.read_text()) or {}
            rel = meta["flavors"]["python_function"]["artifacts"]["hf_model"]["path"]
            if (root / rel / "config.json").is_file():
                return root / rel
        except (KeyError, TypeError, yaml.YAMLError):
            pass
    found = sorted(root.rglob("config.json"), key=lambda p: len(p.parts))
    return found[0].parent if found else None
