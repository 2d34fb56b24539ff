"""Every YAML under jobs/configs, tune and serve_configs loads with the loader of the job that runs it, in one
vocabulary: the model is the top-level ``model`` (train, tune, eval) or ``args.model`` (serve), beside ``device``
(cpu/cuda), ``dtype``, ``num_draft`` and ``chat_template`` where they apply. Old keys are refused with an error that
names the new key; ``base:`` lets a config extend another (the LLaMA-2 configs share one).

Offline: no model is downloaded (MLflow URIs and hub ids give their depth as ``num_layers``); the embedded SmolLM2's
config.json is read where a config names it. ``--check`` of the job scripts is run on the same files in
test_job_check.py (train, eval, threshold search) and test_draft_search.py (draft search).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from layerexit.config import file_vocabulary, lift_model_keys, load_config, with_base
from layerexit.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
ALL_YAML = sorted([*(REPO / "jobs" / "configs").glob("*.yaml"), *(REPO / "tune").glob("*.yaml"),
                   *(REPO / "serve_configs").glob("*.yaml")])


@pytest.fixture(autouse=True)
def offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _raw(path: Path) -> dict:
    return with_base(yaml.safe_load(path.read_text()), path)


def load_any(path: Path, tmp_path: Path):
    """Load ``path`` with the loader of the job that runs it (the script its opening command names)."""
    from layerexit.evaluation.config import EvalConfig
    from layerexit.training.config import load_train_config
    from layerexit.tuning.config import TuneSearchConfig
    from layerexit.tuning.draft_config import DraftTuneConfig

    first = path.read_text().splitlines()[0]
    if path.parent.name == "serve_configs":
        return load_serve_config(path)
    overrides = [f"model={tmp_path}"] if _raw(path).get("model") == "tiny-model-dir" else []
    if overrides:
        from layerexit.models.tiny import save_tiny_checkpoint

        save_tiny_checkpoint(tmp_path)
    if "jobs/train_lite.py" in first:
        return load_train_config(path, overrides)
    if "jobs/evaluate.py" in first or path.name.startswith("eval_"):
        return load_config(EvalConfig, path, overrides)
    if "jobs/tune_draft.py" in first or path.name.endswith("_draft.yaml"):
        from layerexit.tuning.eagle3_search import Eagle3TuneConfig, is_eagle3_config

        return load_config(Eagle3TuneConfig if is_eagle3_config(path) else DraftTuneConfig, path, overrides)
    if path.parent.name == "tune":
        return load_config(TuneSearchConfig, path, overrides)
    raise AssertionError(f"{path}: no loader known (its first line names the job that runs it: {first!r})")


def load_serve_config(path: Path) -> list:
    """Every application's args with the backend's own schema; an engine deployment's user_config as an
    ExitConfig."""
    from layerexit.serving.config import exit_config_from_user_config, parse_serve_args
    from layerexit.serving.vllm_config import parse_vllm_args

    doc = yaml.safe_load(path.read_text())
    loaded = []
    for app in doc["applications"]:
        source = f"{path.name}:{app['name']}"
        if app["import_path"].startswith("layerexit.serving.vllm_backend"):
            loaded.append(parse_vllm_args(app.get("args"), source))
        else:
            assert app["import_path"].startswith("layerexit.serving.app"), source
            loaded.append(parse_serve_args(app.get("args"), source))
            for dep in app.get("deployments", []):
                if "user_config" in dep:
                    loaded.append(exit_config_from_user_config(dep["user_config"]))
    return loaded


def test_every_directory_has_configs() -> None:
    for folder in ("jobs/configs", "tune", "serve_configs"):
        assert any(p.is_relative_to(REPO / folder) for p in ALL_YAML), folder


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_config_loads_with_its_loader(path: Path, tmp_path: Path, request) -> None:
    raw = _raw(path)
    if raw.get("model") == "smollm2" or "smollm2" in path.name and path.parent.name != "serve_configs":
        request.getfixturevalue("smollm2_path")  # the depth check reads the embedded model's config.json
    assert load_any(path, tmp_path)


@pytest.mark.parametrize("path", [p for p in ALL_YAML if p.parent.name != "serve_configs"],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_the_model_is_named_by_one_top_level_key(path: Path) -> None:
    """Train, tune and eval configs name the model as the serve args do: ``model: <spec>``, a string."""
    raw = _raw(path)
    assert "model" not in raw or isinstance(raw["model"], str), f"{path.name}: model must be a spec string"
    assert raw.get("device") in (None, "auto", "cpu", "cuda") or str(raw["device"]).startswith("cuda:")


@pytest.mark.parametrize("path", sorted((REPO / "serve_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_serve_configs_use_the_same_words(path: Path) -> None:
    for app in yaml.safe_load(path.read_text())["applications"]:
        args = app.get("args", {})
        assert isinstance(args.get("model", ""), str)
        assert args.get("device", "cpu") in ("auto", "cpu", "cuda"), f"{path.name}: device cpu/cuda"
        assert "num_speculative_tokens" not in args, f"{path.name}: the draft length is num_draft"


@pytest.mark.parametrize(("loader", "data", "new_key"), [
    ("train", {"name": "t", "model": {"spec": "tiny"}}, "`model: <spec>`"),
    ("tune", {"model": {"spec": "smollm2", "device": "cpu"}, "space": {"exit_layers": [1]}}, "model.device -> device"),
    ("draft", {"model": "smollm2", "space": {"layers": [1], "num_speculative_tokens": [1, 2]}}, "`num_draft`"),
    ("vllm", {"num_speculative_tokens": 3}, "`num_draft`"),
    ("vllm", {"device": "gpu"}, "device: cuda"),
    ("tune", {"model": "smollm2", "model_name": "x", "device": "gpu0", "space": {"exit_layers": [1]}}, None),
])
def test_old_keys_are_refused_naming_the_new_key(loader: str, data: dict, new_key: str | None) -> None:
    from layerexit.config import validate_config
    from layerexit.serving.vllm_config import VllmServeArgs
    from layerexit.training.config import TrainConfig
    from layerexit.tuning.config import TuneSearchConfig
    from layerexit.tuning.draft_config import DraftTuneConfig

    cls = {"train": TrainConfig, "tune": TuneSearchConfig, "draft": DraftTuneConfig, "vllm": VllmServeArgs}[loader]
    if new_key is None:  # the new vocabulary: accepted, and lands in the internal model section
        cfg = validate_config(cls, data, "test")
        assert (cfg.model.spec, cfg.model.name, cfg.model.device) == ("smollm2", "x", "gpu0")
        return
    with pytest.raises(ConfigError, match=new_key.replace("(", r"\(").replace(".", r"\.")):
        validate_config(cls, data, "test")


def test_file_vocabulary_round_trips() -> None:
    from layerexit.tuning.config import TuneSearchConfig

    data = {"model": "smollm2", "model_name": "m", "device": "cpu", "dtype": "bfloat16", "kv": "recompute"}
    lifted = lift_model_keys(TuneSearchConfig, data, "test")
    assert lifted == {"model": {"spec": "smollm2", "name": "m", "device": "cpu", "dtype": "bfloat16"},
                      "kv": "recompute"}
    assert file_vocabulary(lifted) == data


def test_a_base_file_is_extended_key_by_key(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("a: 1\nsection: {x: 1, y: [1, 2]}\nkeep: k\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\na: 2\nsection: {y: [3]}\n")
    assert with_base(yaml.safe_load((tmp_path / "child.yaml").read_text()), tmp_path / "child.yaml") == \
        {"a": 2, "section": {"x": 1, "y": [3]}, "keep": "k"}
    (tmp_path / "loop.yaml").write_text("base: loop2.yaml\n")
    (tmp_path / "loop2.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        with_base({"base": "loop2.yaml"}, tmp_path / "loop.yaml")
    with pytest.raises(ConfigError, match="base file not found"):
        with_base({"base": "missing.yaml"}, tmp_path / "child.yaml")


def test_the_llama_configs_share_one_base() -> None:
    """llama2_7b_it and llama2_13b_lite extend llama2_7b_lite: only what differs is written in them."""
    from layerexit.training.config import load_train_config

    lite = load_train_config(REPO / "jobs/configs/llama2_7b_lite.yaml")
    it = load_train_config(REPO / "jobs/configs/llama2_7b_it.yaml")
    big = load_train_config(REPO / "jobs/configs/llama2_13b_lite.yaml")
    for cfg in (it, big):
        assert yaml.safe_load((REPO / "jobs/configs" / f"{cfg.name}.yaml").read_text())["base"] == \
            "llama2_7b_lite.yaml"
        assert (cfg.data, cfg.deepspeed, cfg.checkpoint, cfg.mlflow) == \
            (lite.data, lite.deepspeed, lite.checkpoint, lite.mlflow)
    assert it.lite.weights == "final_only" and it.lite.exit_layers == lite.lite.exit_layers
    assert big.model.spec == "meta-llama/Llama-2-13b-hf" and big.model.num_layers == 40
    assert big.train_batch_size == lite.train_batch_size == 128
