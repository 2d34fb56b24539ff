"""The draft settings a trained model carries: which exit drafts, how many tokens, when a draft stops, and the
static draft vocabulary, chosen by the training job from measured acceptance.

A model directory ships them as ``draft_settings.json`` (and, when it has one, ``draft_vocab.json``), so
``{"policy": "self-speculative"}`` on that model drafts as trained without further options; any option a request
sets explicitly wins over the shipped one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from layerexit.errors import ConfigError

SETTINGS_FILE = "draft_settings.json"
VOCAB_FILE = "draft_vocab.json"
FORMAT = "layerexit-draft-settings/1"
_ATTR = "_layerexit_draft_settings"
KEYS = ("layer", "num_draft", "draft_stop", "draft_vocab", "draft")


def write_draft_settings(model_dir: str | Path, settings: Mapping[str, Any]) -> Path:
    """Write ``draft_settings.json`` into ``model_dir`` (``draft_vocab`` relative to it); returns the file."""
    unknown = set(settings) - set(KEYS)
    if unknown:
        raise ValueError(f"unknown draft settings {sorted(unknown)}")
    path = Path(model_dir) / SETTINGS_FILE
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps({"format": FORMAT, **settings}, indent=2))
    tmp.replace(path)
    return path


def read_draft_settings(model_dir: str | Path) -> dict[str, Any]:
    """The settings shipped in ``model_dir`` ({} when none), with ``draft_vocab`` made an absolute path."""
    path = Path(model_dir) / SETTINGS_FILE
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if data.pop("format", None) != FORMAT:
        raise ConfigError(f"{path} is not a draft settings file", f"expected format {FORMAT}")
    if data.get("draft_vocab"):
        vocab = Path(model_dir) / data["draft_vocab"]
        if not vocab.is_file():
            raise ConfigError(f"{path}: draft_vocab {vocab} is missing", "re-export the model from its training run")
        data["draft_vocab"] = str(vocab)
    return {k: v for k, v in data.items() if k in KEYS and v is not None}


def attach_draft_settings(model, settings: Mapping[str, Any]) -> None:
    object.__setattr__(model, _ATTR, dict(settings))


def draft_settings_of(model) -> dict[str, Any]:
    return dict(getattr(model, _ATTR, None) or {})


def apply_draft_settings(exit_config, settings: Mapping[str, Any]):
    """``exit_config`` with the model's draft settings filled in where the caller set nothing explicitly."""
    if exit_config.policy != "self-speculative" or not settings:
        return exit_config
    fill = {k: v for k, v in settings.items() if k not in exit_config.model_fields_set}
    return exit_config.model_copy(update=fill) if fill else exit_config
