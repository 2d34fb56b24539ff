"""Serving a model from the MLflow registry: models:/name@alias -> cached local HF directory (sqlite store)."""

from __future__ import annotations

import shutil

import pytest
import yaml

from layerexit.errors import ModelSpecError
from layerexit.serving.model_source import find_thresholds_file, is_mlflow_uri, resolve_model_source


def test_plain_specs_pass_through(tiny_dir) -> None:
    assert not is_mlflow_uri(str(tiny_dir)) and is_mlflow_uri("models:/x@y") and is_mlflow_uri("runs:/abc/model")
    source = resolve_model_source(str(tiny_dir))
    assert source.load_spec == str(tiny_dir) and source.local_dir == tiny_dir
    assert resolve_model_source("smollm2").local_dir is None


def test_registered_model_alias_is_downloaded_once(tmp_path, monkeypatch, tiny_dir) -> None:
    pytest.importorskip("mlflow")
    from layerexit.models.loading import load_model_and_tokenizer
    from layerexit.tracking import log_hf_model, tracked_run

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model_dir = tmp_path / "lite"
    shutil.copytree(tiny_dir, model_dir)
    (model_dir / "thresholds.yaml").write_text(yaml.safe_dump(
        {"model": "tiny", "num_layers": 4, "exit_layers": [1, 2], "thresholds": {1: 0.9, 2: 0.8}}))
    with tracked_run("serving-test", tracking_uri=uri):
        info = log_hf_model(model_dir, registered_name="tiny-lite", alias="champion")
    assert str(info["version"]) == "1"

    cache = tmp_path / "cache"
    source = resolve_model_source("models:/tiny-lite@champion", uri, cache_root=cache)
    assert source.version == "1" and (source.local_dir / "config.json").is_file()
    assert find_thresholds_file(source.local_dir).name == "thresholds.yaml"
    model, tokenizer = load_model_and_tokenizer(source.load_spec)
    assert model.config.num_hidden_layers == 4 and tokenizer.chat_template

    again = resolve_model_source("models:/tiny-lite/1", uri, cache_root=cache)  # same version: from the cache
    assert again.local_dir == source.local_dir
    assert len(list(cache.iterdir())) == 1

    with pytest.raises(ModelSpecError, match="tiny-lite@nope"):
        resolve_model_source("models:/tiny-lite@nope", uri, cache_root=cache)

    # Every --model option (eval, bench, tune, alignment) takes the URI too: resolved by the shared loader.
    monkeypatch.setenv("LAYEREXIT_HOME", str(tmp_path / "home"))
    model, _ = load_model_and_tokenizer("models:/tiny-lite@champion")
    assert model.config.num_hidden_layers == 4
    assert (tmp_path / "home" / "mlflow").is_dir()
