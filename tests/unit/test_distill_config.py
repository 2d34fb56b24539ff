"""The recipe settings in the training config: defaults keep the paper's CE-LITE; bad input fails at load, naming
the field, before any worker starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from layerexit.errors import ConfigError
from layerexit.training.config import load_train_config

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, tiny_dir: Path, body: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(f"name: t\nmodel: {tiny_dir}\nlite:\n  exit_layers: [1, 2, 3]\n{body}")
    return path


def test_paper_configs_stay_ce_lite():
    for name in ("llama2_7b_lite.yaml", "llama2_13b_lite.yaml"):
        assert load_train_config(REPO / "jobs/configs" / name).recipe == "lite"


def test_distill_config_is_the_adapters_recipe(smollm2_path):
    cfg = load_train_config(REPO / "jobs/configs/smollm2_adapters.yaml")
    assert cfg.recipe == "adapters" and cfg.registered_model_name == "layerexit-smollm2_adapters"
    assert cfg.mlflow.alias == "trained" and cfg.data.samples_per_instruction > 0


@pytest.mark.parametrize("body, field", [
    ("recipe: distill\ndistill:\n  top_k: 100000\n", "distill.top_k"),
    ("recipe: adapters\ndistill:\n  temperature: 0\n", "temperature"),
    ("recipe: adapters\ndistill:\n  temperature: -1.5\n", "temperature"),
    ("recipe: distill\ndeepspeed:\n  zero_stage: 3\n", "zero_stage"),
    ("recipe: adapters\nlite:\n  exit_layers: [2, 9]\n", "exit_layers"),
    ("recipe: adapters\nlite:\n  exit_layers: []\n", "exit_layers"),
    ("recipe: sideways\n", "recipe"),
    ("recipe: adapters\nadapters:\n  rnak: 4\n", "rnak"),
])
def test_bad_recipe_settings_name_the_field(tmp_path, tiny_dir, body, field):
    path = _write(tmp_path, tiny_dir, body)
    if "exit_layers: [2, 9]" in body or "exit_layers: []" in body:
        path.write_text(f"name: t\nmodel: {tiny_dir}\n{body}")
    with pytest.raises(ConfigError, match=field):
        load_train_config(path)


def test_half_written_cache_dir_is_rejected_at_load(tmp_path, tiny_dir):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "teacher.safetensors").write_bytes(b"\x00" * 8)  # no meta.json: a crashed build
    path = _write(tmp_path, tiny_dir, f"recipe: adapters\ndistill:\n  cache_dir: {cache}\n")
    with pytest.raises(ConfigError, match="distill.cache_dir"):
        load_train_config(path)
