"""Exit thresholds: the paper's presets, mapping them onto a model's depth, and the thresholds file.

A thresholds file (YAML or JSON) names the model it was made for, its exit layers, the policy, the per-layer
thresholds and optionally the AdaInfer classifier, so a Tune result can be deployed and checked against the
model that loads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from pydantic import Field, field_validator

from layerexit.config import StrictModel, validate_config
from layerexit.errors import ConfigError

# Paper section 6.5 (7B), Appendix B.7 (aggressive 7B), Appendix B.8 (13B). Layer numbers are for the
# paper's models (32 and 40 layers).
PRESETS: dict[str, tuple[int, dict[int, float]]] = {
    "paper-7b": (32, {8: 0.95, 12: 0.95, 16: 0.9, 20: 0.9, 24: 0.8, 28: 0.7}),
    "paper-7b-aggressive": (32, {8: 0.85, 12: 0.85, 16: 0.8, 20: 0.8, 24: 0.7, 28: 0.6}),
    "paper-13b": (40, {8: 0.95, 12: 0.95, 16: 0.9, 20: 0.9, 24: 0.8, 28: 0.7, 32: 0.7, 36: 0.65}),
}


def map_preset(name: str, num_layers: int) -> dict[int, float]:
    """A preset's thresholds on a model with ``num_layers`` layers.

    Layer numbers are kept when every one of them is an intermediate layer of the model (SmolLM2's 30 layers
    take the 7B preset's 8..28 as they are, which is also where its LITE exits are trained); otherwise they
    are scaled by depth (``round(l * L / L_paper)``), merging collisions by keeping the stricter threshold.
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown thresholds preset {name!r}", f"use one of {', '.join(PRESETS)} or a thresholds file")
    paper_layers, table = PRESETS[name]
    if all(l < num_layers for l in table):
        return dict(table)
    mapped: dict[int, float] = {}
    for layer, thr in table.items():
        new = min(max(1, round(layer * num_layers / paper_layers)), num_layers - 1)
        mapped[new] = max(thr, mapped.get(new, 0.0))
    return mapped


class LinearClassifier(StrictModel):
    """AdaInfer's per-layer SVM on [top-1 prob, top-1 minus top-2 prob], stored as numbers (no pickle)."""

    features: list[str] = Field(default_factory=lambda: ["top_prob", "gap"])
    mean: dict[int, list[float]] = Field(description="Per-layer feature means (standardisation).")
    scale: dict[int, list[float]] = Field(description="Per-layer feature scales (standardisation).")
    coef: dict[int, list[float]] = Field(description="Per-layer linear SVM weights.")
    intercept: dict[int, float] = Field(description="Per-layer linear SVM bias; exit when w.x + b > 0.")


class LinearProbe(StrictModel):
    """Per exit layer, logistic-regression weights on the final-normed hidden state: P(top-1 agrees with final)."""

    weight: dict[int, list[float]] = Field(description="Per-layer weight vector (hidden size).")
    bias: dict[int, float] = Field(description="Per-layer bias.")


class ThresholdsFile(StrictModel):
    """What a thresholds YAML/JSON holds."""

    model: str = Field(description="Name of the model the thresholds were made for.")
    num_layers: int = Field(ge=1, description="Decoder layers of that model; checked when loading.")
    exit_layers: list[int] = Field(description="Exit layers (intermediate, ascending).")
    policy: str = Field("confidence", description="Policy the thresholds are for: confidence, classifier or probe.")
    thresholds: dict[int, float] = Field(
        default_factory=dict, description="Per-layer thresholds in [0, 1] (softmax confidence, or probe probability)."
    )
    classifier: LinearClassifier | None = None
    probe: LinearProbe | None = None
    source: str | None = Field(None, description="Where it came from (Tune run id, preset...).")

    @field_validator("thresholds")
    @classmethod
    def _in_unit_range(cls, value: dict[int, float]) -> dict[int, float]:
        bad = {k: v for k, v in value.items() if not 0.0 <= v <= 1.0}
        if bad:
            raise ValueError(f"thresholds must be in [0, 1], got {bad}")
        return value

    def check_model(self, num_layers: int, name: str | None = None) -> None:
        if num_layers != self.num_layers:
            raise ConfigError(
                f"thresholds file was made for {self.model} with {self.num_layers} layers, "
                f"but the model has {num_layers}",
                "use thresholds made for this model (layerexit tune) or a preset",
            )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        data = self.model_dump(mode="json", exclude_none=True)
        text = json.dumps(data, indent=2) if path.suffix == ".json" else yaml.safe_dump(data, sort_keys=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
        return path


_LOADED: dict[tuple[str, int, int], ThresholdsFile] = {}


def load_thresholds_file(path: str | Path) -> ThresholdsFile:
    """Read a thresholds YAML/JSON file with errors naming the field.

    Parsed files are cached by (path, mtime, size): a policy is built per engine call (per Serve batch), and a
    probe's weights make the YAML ~100 KB, ~0.1 s to parse. Treat the returned object as read-only.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"thresholds file not found: {path}", "pass a preset name or an existing file")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _LOADED:
        if len(_LOADED) >= 64:
            _LOADED.clear()
        _LOADED[key] = _parse_thresholds_file(path)
    return _LOADED[key]


def _parse_thresholds_file(path: Path) -> ThresholdsFile:
    try:
        data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"thresholds file {path} is not valid YAML/JSON: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"thresholds file {path} must hold a mapping")
    return validate_config(ThresholdsFile, data, str(path))
