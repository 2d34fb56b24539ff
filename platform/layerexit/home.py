"""Where layerexit keeps what it downloads or converts: ``$LAYEREXIT_HOME`` (default ``~/.cache/layerexit``)."""

from __future__ import annotations

import os
from pathlib import Path


def layerexit_home() -> Path:
    """Return the cache root, creating it if needed."""
    root = Path(os.environ.get("LAYEREXIT_HOME", Path.home() / ".cache" / "layerexit")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def models_dir() -> Path:
    """Directory holding converted Hugging Face checkpoints."""
    path = layerexit_home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path
