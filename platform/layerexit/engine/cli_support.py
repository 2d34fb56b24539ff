"""Turning command-line strings into engine configs (shared by `layerexit generate`, `bench`, jobs)."""

from __future__ import annotations

from layerexit.config import validate_config
from layerexit.engine.options import ExitConfig
from layerexit.errors import ConfigError


def parse_thresholds(value: str | None):
    """``paper-7b`` / ``path.yaml`` stay strings; ``8:0.9,12:0.8`` becomes {8: 0.9, 12: 0.8}."""
    if value is None or ":" not in value or value.endswith((".yaml", ".yml", ".json")):
        return value
    table = {}
    for item in value.split(","):
        try:
            layer, thr = item.split(":")
            table[int(layer)] = float(thr)
        except ValueError:
            raise ConfigError(f"cannot read threshold {item!r}", "write thresholds like 8:0.9,12:0.8") from None
    return table


def exit_config_from_options(policy: str, thresholds: str | None = None, kv: str = "recompute",
                             layer: int | None = None, exit_layers: str | None = None,
                             num_draft: int = 4, extra: str | None = None) -> ExitConfig:
    """An ExitConfig from command-line options; ``extra`` is a JSON early_exit object whose fields win
    (check_vocab, draft, draft_stop, draft_vocab, ...)."""
    data = {"policy": policy, "kv": kv, "num_draft": num_draft}
    if thresholds is not None:
        data["thresholds"] = parse_thresholds(thresholds)
    if layer is not None:
        data["layer"] = layer
    if exit_layers:
        try:
            data["exit_layers"] = [int(x) for x in exit_layers.split(",")]
        except ValueError:
            raise ConfigError(f"cannot read exit layers {exit_layers!r}", "write them like 8,12,16") from None
    if extra:
        import json

        try:
            more = json.loads(extra)
        except json.JSONDecodeError as err:
            raise ConfigError(f"--early-exit is not JSON ({err})", "pass an early_exit object, e.g. "
                              "'{\"draft\": \"ngram\", \"num_draft\": 10}'") from None
        if not isinstance(more, dict):
            raise ConfigError("--early-exit must be a JSON object", "e.g. '{\"check_vocab\": 64}'")
        data.update(more)
    return validate_config(ExitConfig, data, "(command line)")
