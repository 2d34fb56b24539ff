"""Training config: every job YAML loads; bad input fails at load naming the field; derived DeepSpeed settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from layerexit.config import with_base
from layerexit.errors import ConfigError
from layerexit.training.config import TrainConfig, load_train_config

REPO = Path(__file__).resolve().parents[2]
TRAIN_CONFIGS = sorted(p for p in (REPO / "jobs" / "configs").glob("*.yaml")
                       if "train_lite.py" in p.read_text().splitlines()[0])


def test_training_configs_exist():
    names = {p.name for p in TRAIN_CONFIGS}
    assert {"llama2_7b_lite.yaml", "llama2_7b_it.yaml", "llama2_13b_lite.yaml", "smollm2_lite.yaml"} <= names


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_every_training_config_loads(path, request):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ray job submit --address http://127.0.0.1:8265 --working-dir . -- python "
                            f"jobs/train_lite.py --config jobs/configs/{path.name}")
    raw = with_base(yaml.safe_load(path.read_text()), path)
    if raw["model"] == "smollm2":
        request.getfixturevalue("smollm2_path")  # the depth check reads the embedded model's config
    cfg = load_train_config(path)
    assert cfg.name == path.stem
    assert cfg.train_batch_size == cfg.optim.micro_batch_size * cfg.optim.grad_accum * cfg.scaling.num_workers


def test_paper_configs_match_the_paper():
    lite = load_train_config(REPO / "jobs/configs/llama2_7b_lite.yaml")
    it = load_train_config(REPO / "jobs/configs/llama2_7b_it.yaml")
    big = load_train_config(REPO / "jobs/configs/llama2_13b_lite.yaml")
    assert lite.lite.exit_layers == [8, 12, 16, 20, 24, 28] and lite.lite.weights == "uniform"
    assert lite.optim.epochs == 5 and lite.deepspeed.zero_stage == 3 and lite.precision == "bf16"
    assert lite.scaling.num_workers == 4 and lite.scaling.use_gpu and lite.data.source == "alpaca"
    assert it.lite.weights == "final_only"
    assert big.lite.exit_layers == list(range(8, 40, 4)) and big.model.num_layers == 40


def _write(tmp_path, data: dict) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture()
def alpaca_file(tmp_path) -> Path:
    path = tmp_path / "alpaca.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(20)))
    return path


@pytest.fixture()
def base(tiny_dir, alpaca_file) -> dict:
    return {"name": "t", "model": str(tiny_dir),
            "data": {"source": "alpaca", "path": str(alpaca_file)},
            "lite": {"exit_layers": [1, 2, 3]}, "scaling": {"num_workers": 2}}


def test_valid_tiny_config(tmp_path, base):
    cfg = load_train_config(_write(tmp_path, base), ["optim.lr=1e-3"])
    assert cfg.optim.lr == 1e-3 and cfg.registered_model_name == "layerexit-t"


@pytest.mark.parametrize("override, field", [
    (["optim.lrr=1"], "optim.lrr: unknown key"),
    (["lite.exit_layers=[2, 4]"], "lite.exit_layers"),
    (["lite.exit_layers=[9]"], "lite.exit_layers"),
    (["lite.weights=[1, 1]"], "lite.weights"),
    (["optim.global_batch_size=6"], "optim.global_batch_size"),
    (["optim.micro_batch_size=0"], "optim.micro_batch_size"),
    (["data.path=/no/such/file.jsonl"], "data.path"),
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage"),
    (["mlflow.alias=latest"], "mlflow.alias"),
    (["num_layers=8"], "num_layers=8 but"),
    (["name=bad name"], "name"),
    (["recipe=adapters", "adapters.kind=decoder_layer", "adapters.num_layers=2"], "adapters.num_layers"),
    (["recipe=adapters", "adapters.kind=attention"], "adapters.kind"),
    (["recipe=adapters", "adapters.init=random"], "adapters.init"),
    (["draft.choose=true", "draft.max_layer=0"], "draft.max_layer"),
    (["draft.choose=true", "lite.exit_layers=[2, 3]", "draft.max_layer=1"], "draft.max_layer"),
    (["recipe=adapters", "draft.vocab_size=100000"], "draft.vocab_size"),
])
def test_bad_input_names_the_field(tmp_path, base, override, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[")):
        load_train_config(_write(tmp_path, base), override)


def test_dataset_without_needed_columns(tmp_path, base):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(ConfigError, match="data.path: .*neither 'messages' nor 'instruction'"):
        load_train_config(_write(tmp_path, base), [f"data.path={bad}"])
    bad.write_text('{"instruction": "q", "output": "a"}\n{"instruction": "q2"}\n')
    with pytest.raises(ConfigError, match=r"data.path: .*record 1 lacks the column\(s\) \['output'\]"):
        load_train_config(_write(tmp_path, base), [f"data.path={bad}"])
    with pytest.raises(ConfigError, match="data.source"):
        load_train_config(_write(tmp_path, base), [f"data.path={bad}", "data.source=chat"])


def test_unreadable_hub_model_needs_num_layers(tmp_path, base, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base["model"] = "no-such-org/no-such-model"
    with pytest.raises(ConfigError, match="set num_layers"):
        load_train_config(_write(tmp_path, base))
    base["num_layers"] = 32
    base["lite"]["exit_layers"] = [8, 32]
    with pytest.raises(ConfigError, match=r"lite.exit_layers: \[32\]"):
        load_train_config(_write(tmp_path, base))


def test_deepspeed_config_and_precision(tmp_path, base, monkeypatch):
    from layerexit import machine
    from layerexit.training.ray_trainer import deepspeed_config

    # precision auto on a CPU without native bf16 (test_machine_dtype.py covers the other CPUs)
    monkeypatch.setattr(machine, "detect_cpu", lambda: machine.CpuInfo("AMD EPYC", frozenset({"avx2"}), "AVX2"))

    cfg = load_train_config(_write(tmp_path, base), [
        "optim.micro_batch_size=3", "optim.grad_accum=5", "deepspeed.zero_stage=3",
        "deepspeed.extra={zero_optimization: {reduce_bucket_size: 1000}}"])
    ds = deepspeed_config(cfg)
    assert ds["train_batch_size"] == 30 and ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 5 and ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True,
                                       "reduce_bucket_size": 1000}
    assert cfg.precision == "fp32" and "bf16" not in ds
    gpu = TrainConfig.model_validate({**cfg.model_dump(), "scaling": {"num_workers": 2, "use_gpu": True}})
    assert gpu.precision == "bf16" and deepspeed_config(gpu)["bf16"] == {"enabled": True}


def test_too_little_data_for_one_global_batch(tmp_path, base):
    from layerexit.training.ray_trainer import total_steps

    cfg = load_train_config(_write(tmp_path, base), ["optim.micro_batch_size=8", "optim.epochs=3"])
    assert total_steps(cfg, 33) == 2 * 3 and total_steps(cfg, 64) == 12
    assert total_steps(cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"max_steps": 5})}), 64) == 5
    with pytest.raises(ConfigError, match="optim.micro_batch_size"):
        total_steps(cfg, 15)


def test_flat_params_cover_every_section(tmp_path, base):
    params = load_train_config(_write(tmp_path, base)).flat_params()
    for key in ("model.spec", "lite.exit_layers", "optim.lr", "deepspeed.zero_stage", "scaling.num_workers",
                "checkpoint.max_failures", "mlflow.experiment", "eval.alignment_prompts"):
        assert key in params


def test_resuming_a_folder_of_another_config_is_a_clear_error(tmp_path):
    """A checkpoint folder holding another config's run would be resumed silently by Ray Train (and its MLflow
    run reopened): the job refuses before any work, naming what differs; more steps or other logging still resume."""
    import json

    from layerexit.training.config import load_train_config
    from layerexit.training.ray_trainer import RUN_INFO_FILE, check_resume_compatible

    path = REPO / "jobs" / "configs" / "smollm2_adapters.yaml"
    cfg = load_train_config(path, [f"checkpoint.storage_path={tmp_path}"])
    check_resume_compatible(cfg)  # nothing there yet
    folder = tmp_path / cfg.name
    folder.mkdir()
    (folder / RUN_INFO_FILE).write_text(json.dumps({"run_id": "r", "tracking_uri": "u", "config": cfg.flat_params()}))
    check_resume_compatible(load_train_config(path, [f"checkpoint.storage_path={tmp_path}", "optim.max_steps=5000",
                                                     "eval.every_steps=100"]))
    other = load_train_config(path, [f"checkpoint.storage_path={tmp_path}", "adapters.rank=64"])
    with pytest.raises(ConfigError, match=r"adapters\.rank: '1024' there, '64' now") as err:
        check_resume_compatible(other)
    assert "new checkpoint.storage_path" in str(err.value)
    # A folder from before the config was recorded (run id only) still resumes.
    (folder / RUN_INFO_FILE).write_text(json.dumps({"run_id": "r", "tracking_uri": "u"}))
    check_resume_compatible(other)
