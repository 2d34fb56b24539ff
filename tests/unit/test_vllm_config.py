"""The vLLM backend's config and its checks before any replica starts (main .venv: no vLLM, nothing loaded).

- every vLLM Serve config (serve_configs/smollm2_vllm.yaml, and 7b.yaml / 13b.yaml: the GPU defaults) is a Ray Serve
  config whose args validate (``VllmServeArgs``);
- bad input fails with a ConfigError naming the field and the fix: a draft for another vocabulary or tokenizer, a
  draft as deep as or deeper than the model, a draft path or MLflow URI that does not resolve, vLLM missing;
- the args map onto Ray Serve LLM's ``LLMConfig`` pieces (engine kwargs, speculative config, env).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from layerexit.errors import ConfigError
from layerexit.serving import vllm_backend
from layerexit.serving.vllm_config import (
    ALPACA_CHAT_TEMPLATE,
    ResolvedSources,
    check_draft,
    parse_vllm_args,
    resolve_sources,
)

REPO = Path(__file__).resolve().parents[2]
VLLM_IMPORT = "layerexit.serving.vllm_backend:build_app"
VLLM_CONFIGS = sorted(p for p in (REPO / "serve_configs").glob("*.yaml")
                      if any(a["import_path"] == VLLM_IMPORT for a in yaml.safe_load(p.read_text())["applications"]))


def fake_checkpoint(directory: Path, *, layers: int = 4, vocab: int = 8, hidden: int = 16, words: str = "abcdefgh",
                    max_positions: int = 256) -> Path:
    """config.json + tokenizer.json, all the checks read (no weights: nothing here loads a model)."""
    directory.mkdir(parents=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": layers,
              "hidden_size": hidden, "vocab_size": vocab, "max_position_embeddings": max_positions}
    (directory / "config.json").write_text(json.dumps(config))
    tokenizer = {"model": {"type": "BPE", "vocab": {w: i for i, w in enumerate(words)}, "merges": []},
                 "added_tokens": [{"id": 0, "content": words[0]}]}
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer))
    return directory


@pytest.fixture
def model_dir(tmp_path) -> Path:
    return fake_checkpoint(tmp_path / "model", layers=4)


def args_for(model: Path, draft: str | Path | None, **extra) -> dict:
    return {"model": str(model), "draft": None if draft is None else str(draft), "device": "cpu", **extra}


# ------------------------------------------------------------------------------------------ the configs


@pytest.mark.parametrize("path", VLLM_CONFIGS, ids=[p.name for p in VLLM_CONFIGS])
def test_every_vllm_serve_config_is_valid(path: Path) -> None:
    from ray.serve.schema import ServeDeploySchema

    text = path.read_text()
    assert text.splitlines()[0].endswith(f"serve run serve_configs/{path.name}")
    config = ServeDeploySchema.model_validate(yaml.safe_load(text))
    for app in config.applications:
        assert app.import_path == "layerexit.serving.vllm_backend:build_app"
        cfg = parse_vllm_args(app.args, f"{path.name} args")
        assert cfg.draft_kind in ("ngram", "model")  # each config shows speculative decoding


def test_the_three_vllm_configs_exist_and_say_where_they_run() -> None:
    names = {p.name for p in VLLM_CONFIGS}
    assert {"smollm2_vllm.yaml", "7b.yaml", "13b.yaml"} <= names
    assert not list((REPO / "serve_configs").glob("[0-9]*b_vllm.yaml")), "7b.yaml / 13b.yaml are the vLLM configs"
    cpu = parse_vllm_args(yaml.safe_load((REPO / "serve_configs/smollm2_vllm.yaml").read_text())
                          ["applications"][0]["args"])
    assert cpu.device == "cpu" and cpu.enforce_eager and cpu.cpu_reserved_cpus == 0
    assert (REPO / "serve_configs/smollm2_vllm.yaml").read_text().startswith(
        "# .venv-vllm/bin/serve run serve_configs/smollm2_vllm.yaml")
    for name in ("7b.yaml", "13b.yaml"):
        text = (REPO / "serve_configs" / name).read_text()
        gpu = parse_vllm_args(yaml.safe_load(text)["applications"][0]["args"])
        assert gpu.device == "cuda" and gpu.gpu_memory_utilization and gpu.max_model_len
        assert gpu.model.startswith("models:/") and gpu.chat_template == "alpaca"
        # The opening comment says why vLLM is the GPU default and where the exit policies went.
        head = text.split("proxy_location")[0]
        assert "0.55x" in head and f"serve_configs/{name.replace('.yaml', '_exits.yaml')}" in head


def test_the_7b_default_serves_the_eagle3_draft_its_job_registers() -> None:
    """serve_configs/7b.yaml serves the model jobs/configs/llama2_7b_eagle3.yaml registers, with the EAGLE-3 draft it
    ships, trained on the frozen LITE model (its final layer stays the LITE model's, which a lossless draft needs)."""
    from layerexit.training import load_train_config

    train = load_train_config(REPO / "jobs" / "configs" / "llama2_7b_eagle3.yaml", check=False)
    args = parse_vllm_args(yaml.safe_load((REPO / "serve_configs" / "7b.yaml").read_text())["applications"][0]["args"])
    assert args.model == f"models:/{train.registered_model_name}@{train.mlflow.alias}"
    assert args.draft_shipped and train.recipe == "eagle3"
    assert train.model.spec == "models:/layerexit-llama2_7b_lite@trained"


def test_the_13b_default_serves_the_eagle3_draft_its_job_registers() -> None:
    """serve_configs/13b.yaml serves the model jobs/configs/llama2_13b_eagle3.yaml registers, with the EAGLE-3 draft
    it ships (eagle3/ + draft_settings.json), and that job trains a feature draft on the 13B LITE model."""
    from layerexit.training import load_train_config

    train = load_train_config(REPO / "jobs" / "configs" / "llama2_13b_eagle3.yaml", check=False)
    args = parse_vllm_args(yaml.safe_load((REPO / "serve_configs" / "13b.yaml").read_text())["applications"][0]["args"])
    assert args.model == f"models:/{train.registered_model_name}@{train.mlflow.alias}"
    assert args.draft == "shipped" and train.recipe == "eagle3" and train.model.num_layers == 40
    assert train.model.spec == "models:/layerexit-llama2_13b_lite@trained"


# --------------------------------------------------------------------------------------------- bad input


def test_unknown_and_misplaced_fields_are_named() -> None:
    with pytest.raises(ConfigError, match="num_speculative_token: unknown key"):
        parse_vllm_args({"num_speculative_token": 3})
    with pytest.raises(ConfigError, match="gpu_memory_utilization applies to device: cuda"):
        parse_vllm_args({"device": "cpu", "gpu_memory_utilization": 0.9})
    with pytest.raises(ConfigError, match="cpu_kvcache_space_gib applies to device: cpu"):
        parse_vllm_args({"device": "cuda", "cpu_kvcache_space_gib": 2})
    with pytest.raises(ConfigError, match="engine_kwargs may not set speculative_config.*draft"):
        parse_vllm_args({"engine_kwargs": {"speculative_config": {"method": "ngram"}}})
    with pytest.raises(ConfigError, match="ngram_prompt_lookup_min"):
        parse_vllm_args({"ngram_prompt_lookup_min": 5, "ngram_prompt_lookup_max": 3})
    with pytest.raises(ConfigError, match="chat_template"):
        parse_vllm_args({"chat_template": "/no/such/template.jinja"})


def test_vllm_missing_is_a_config_error_with_the_fix(model_dir) -> None:
    pytest.importorskip("ray.serve")
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed in this Python; the check is for the main .venv")
    with pytest.raises(ConfigError) as err:
        vllm_backend.build_app(args_for(model_dir, None))
    assert "vLLM is not installed" in err.value.problem
    assert "make vllm-env" in err.value.fix and ".venv-vllm/bin/serve run" in err.value.fix


def test_draft_for_another_vocabulary_is_refused(tmp_path, model_dir) -> None:
    draft = fake_checkpoint(tmp_path / "draft", layers=2, vocab=9, words="abcdefghi")
    with pytest.raises(ConfigError) as err:
        resolve_sources(parse_vllm_args(args_for(model_dir, draft)))
    assert err.value.problem.startswith("draft: vocabulary size 9") and "model's 8" in err.value.problem
    assert "layerexit export-draft" in err.value.fix


def test_draft_with_another_tokenizer_of_the_same_size_is_refused(tmp_path, model_dir) -> None:
    draft = fake_checkpoint(tmp_path / "draft", layers=2, words="hgfedcba")
    with pytest.raises(ConfigError, match="draft: its tokenizer .* differs from the model's"):
        check_draft(model_dir, draft)


@pytest.mark.parametrize("layers", [4, 6])
def test_draft_as_deep_as_the_model_or_deeper_is_refused(tmp_path, model_dir, layers) -> None:
    draft = fake_checkpoint(tmp_path / "draft", layers=layers)
    with pytest.raises(ConfigError) as err:
        resolve_sources(parse_vllm_args(args_for(model_dir, draft)))
    assert f"draft: it has {layers} decoder layers, the model 4" in err.value.problem
    assert "--layer below 4" in err.value.fix


def test_a_shallower_draft_of_the_same_model_resolves(tmp_path, model_dir) -> None:
    draft = fake_checkpoint(tmp_path / "draft", layers=2)
    sources = resolve_sources(parse_vllm_args(args_for(model_dir, draft)))
    assert sources == ResolvedSources(str(model_dir.resolve()), str(draft.resolve()), method="draft_model",
                                      num_draft=3)


def test_missing_draft_directory_names_the_field(tmp_path, model_dir) -> None:
    with pytest.raises(ConfigError, match=r"^draft: .*does not exist"):
        resolve_sources(parse_vllm_args(args_for(model_dir, tmp_path / "no-such-draft")))
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    with pytest.raises(ConfigError, match="draft: .* without config.json"):
        resolve_sources(parse_vllm_args(args_for(model_dir, not_a_model)))


def test_draft_uri_that_does_not_resolve_names_the_field(tmp_path, model_dir, monkeypatch) -> None:
    pytest.importorskip("mlflow")
    monkeypatch.setenv("LAYEREXIT_HOME", str(tmp_path / "home"))
    cfg = parse_vllm_args(args_for(model_dir, "models:/no-such-model-draft@trained",
                                   mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))
    with pytest.raises(ConfigError) as err:
        resolve_sources(cfg)
    assert err.value.problem.startswith("draft: MLflow cannot resolve models:/no-such-model-draft@trained")
    assert "MLFLOW_TRACKING_URI" in err.value.fix


def test_max_model_len_beyond_the_model_is_refused(model_dir) -> None:
    from layerexit.serving.vllm_config import check_max_model_len

    with pytest.raises(ConfigError, match="max_model_len: 4096 exceeds .* 256"):
        check_max_model_len(parse_vllm_args(args_for(model_dir, None, max_model_len=4096)), str(model_dir))


# ----------------------------------------------------------------------------------- what vLLM is given


def test_engine_kwargs_speculative_config_and_env(tmp_path, model_dir) -> None:
    draft = fake_checkpoint(tmp_path / "draft", layers=2)
    cfg = parse_vllm_args(args_for(model_dir, draft, dtype="float32", enforce_eager=True, max_model_len=128,
                                   num_draft=4, engine_kwargs={"max_num_batched_tokens": 512}))
    sources = resolve_sources(cfg)
    kwargs = vllm_backend.engine_kwargs(cfg, sources)
    assert kwargs["speculative_config"] == {"model": str(draft.resolve()), "num_speculative_tokens": 4}
    assert kwargs["dtype"] == "float32" and kwargs["enforce_eager"] and kwargs["max_model_len"] == 128
    assert kwargs["max_num_batched_tokens"] == 512 and "gpu_memory_utilization" not in kwargs
    env = vllm_backend.engine_env(cfg)
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0" and env["VLLM_CPU_OMP_THREADS_BIND"] == "auto"

    ngram = parse_vllm_args(args_for(model_dir, "ngram", num_draft=5))
    assert vllm_backend.speculative_config(ngram, resolve_sources(ngram)) == {
        "method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    off = parse_vllm_args(args_for(model_dir, "none"))
    assert off.draft_kind == "none" and "speculative_config" not in vllm_backend.engine_kwargs(off, resolve_sources(off))
    gpu = parse_vllm_args({"model": str(model_dir), "device": "cuda", "tensor_parallel_size": 2,
                           "gpu_memory_utilization": 0.85})
    assert vllm_backend.engine_kwargs(gpu, resolve_sources(gpu))["tensor_parallel_size"] == 2
    assert "VLLM_CPU_OMP_THREADS_BIND" not in vllm_backend.engine_env(gpu)


def test_alpaca_chat_template_is_the_training_prompt() -> None:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from layerexit.data.datasets import ALPACA_PROMPT_NO_INPUT

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "  Name three colours. "}]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # what transformers renders with
    rendered = env.from_string(ALPACA_CHAT_TEMPLATE).render(messages=messages, bos_token="<s>")
    assert rendered == "<s>" + ALPACA_PROMPT_NO_INPUT.format(instruction="Name three colours.")


def test_served_name_and_cli_strings() -> None:
    assert parse_vllm_args({"model": "models:/layerexit-llama2_7b_lite@trained"}).served_name() == \
        "layerexit-llama2_7b_lite"
    assert parse_vllm_args({"model": "smollm2"}).served_name() == "smollm2"
    coerced = vllm_backend._coerce_cli_args({"num_draft": "4", "draft": "ngram", "enforce_eager": "true"})
    assert coerced == {"num_draft": 4, "draft": "ngram", "enforce_eager": True}


def test_old_keys_are_refused_naming_the_new_ones(tmp_path) -> None:
    """One vocabulary with the engine backend: num_draft (vLLM's num_speculative_tokens), device cuda (not gpu)."""
    with pytest.raises(ConfigError, match="`num_speculative_tokens` was renamed: write `num_draft`"):
        parse_vllm_args({"num_speculative_tokens": 3})
    with pytest.raises(ConfigError, match="device: gpu was renamed: write device: cuda"):
        parse_vllm_args({"device": "gpu"})


def test_chat_template_auto_follows_the_tokenizer(tmp_path) -> None:
    """``auto`` (the engine backend's default) is accepted: the tokenizer's template when it has one, else Alpaca."""
    from layerexit.serving.vllm_config import ALPACA_CHAT_TEMPLATE

    cfg = parse_vllm_args({"chat_template": "auto", "device": "cpu"})
    with_template, without = tmp_path / "with", tmp_path / "without"
    with_template.mkdir(), without.mkdir()
    (with_template / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    (without / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))
    assert cfg.chat_template_text(str(with_template)) is None
    assert cfg.chat_template_text(str(without)) == ALPACA_CHAT_TEMPLATE
