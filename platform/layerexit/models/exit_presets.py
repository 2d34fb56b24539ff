"""Exit presets a model ships: named early-exit settings measured for it, chosen by the threshold search.

A model directory ships them as ``exit_presets.json`` (and, for a static check head, the vocabulary file it
names, relative to the directory). ``jobs/tune_thresholds.py`` writes the confirmed setting as preset ``tuned``
and registers the model with it, so ``{"early_exit": {"preset": "tuned"}}`` (a request) or ``--config
'x={"preset": "tuned"}'`` (``layerexit bench``) runs it; any field the caller sets explicitly wins. Each preset
also records what it measured (``measured``: FLOPs ratio, similarity, prompts), which the engine ignores.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from layerexit.errors import ConfigError

PRESETS_FILE = "exit_presets.json"
FORMAT = "layerexit-exit-presets/1"
_ATTR = "_layerexit_exit_presets"
PATH_KEYS = ("check_vocab_file", "thresholds")


def write_exit_presets(model_dir: str | Path, presets: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write ``exit_presets.json`` into ``model_dir`` (file paths in a preset relative to it); returns the file."""
    path = Path(model_dir) / PRESETS_FILE
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps({"format": FORMAT, "presets": {k: dict(v) for k, v in presets.items()}}, indent=2))
    tmp.replace(path)
    return path


def read_exit_presets(model_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The presets shipped in ``model_dir`` ({} when none), relative file paths made absolute."""
    path = Path(model_dir) / PRESETS_FILE
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise ConfigError(f"{path} is not an exit presets file", f"expected format {FORMAT}")
    out = {}
    for name, preset in (data.get("presets") or {}).items():
        preset = dict(preset)
        for key in PATH_KEYS:
            value = preset.get(key)
            if isinstance(value, str) and (Path(model_dir) / value).is_file():
                preset[key] = str(Path(model_dir) / value)
        out[name] = preset
    return out


def attach_exit_presets(model, presets: Mapping[str, Mapping[str, Any]]) -> None:
    object.__setattr__(model, _ATTR, {k: dict(v) for k, v in presets.items()})


def exit_presets_of(model) -> dict[str, dict[str, Any]]:
    return dict(getattr(model, _ATTR, None) or {})


def apply_exit_preset(exit_config, presets: Mapping[str, Mapping[str, Any]]):
    """``exit_config`` with its ``preset`` filled in where the caller set nothing explicitly (ConfigError naming
    ``preset`` when the model ships no such preset)."""
    name = getattr(exit_config, "preset", None)
    if name is None:
        return exit_config
    if name not in presets:
        raise ConfigError(f"preset {name!r}: this model ships no such exit preset (it has "
                          f"{sorted(presets) or 'none'})", "run the threshold search (jobs/tune_thresholds.py), "
                          "which registers `tuned` with the model, or load the model version it registered")
    fill = {k: v for k, v in presets[name].items() if k != "measured" and k not in exit_config.model_fields_set}
    data = {**exit_config.model_dump(exclude_unset=True), **fill}
    data.pop("preset", None)
    return type(exit_config).model_validate(data)
