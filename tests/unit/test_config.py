"""Config loading: unknown keys and bad ranges are errors naming the field; overrides apply."""

from __future__ import annotations

import pytest

from layerexit.config import LiteLossConfig, apply_overrides, load_config
from layerexit.errors import ConfigError


def test_unknown_key_names_the_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("exit_layers: [8, 12]\nweigths: uniform\n")
    with pytest.raises(ConfigError, match="weigths: unknown key"):
        load_config(LiteLossConfig, path)


def test_bad_values_are_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("weights: linear\nchunk_size: 0\n")
    with pytest.raises(ConfigError) as err:
        load_config(LiteLossConfig, path)
    assert "weights" in str(err.value) and "chunk_size" in str(err.value)


def test_overrides_and_missing_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("exit_layers: [8]\n")
    cfg = load_config(LiteLossConfig, path, ["exit_layers=[4, 8]", "distill_weight=0.5"])
    assert cfg.exit_layers == [4, 8] and cfg.distill_weight == 0.5
    assert apply_overrides({"a": {"b": 1}}, ["a.c=x"]) == {"a": {"b": 1, "c": "x"}}
    with pytest.raises(ConfigError, match="not key=value"):
        apply_overrides({}, ["oops"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(LiteLossConfig, tmp_path / "nope.yaml")
