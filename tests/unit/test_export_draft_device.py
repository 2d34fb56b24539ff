"""``layerexit export-draft --device/--dtype`` and their default: the device and dtype the model was trained with,
read from its training run (issue 29). CPU only: cuda appears only where torch is told no GPU exists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from layerexit.cli import main
from layerexit.errors import ConfigError
from layerexit.models.trained_for import UNKNOWN, choose_placement, trained_placement


def _checkpoint(tmp_path: Path, use_gpu: bool, precision: str) -> Path:
    """A tiny model where a training job leaves it: <storage>/<name>/checkpoint_N/hf_model, with the job's
    layerexit_mlflow.json (the config it ran with, as MLflow params: strings) beside the checkpoints."""
    from layerexit.models.tiny import save_tiny_checkpoint

    run_dir = tmp_path / "storage" / "tiny_draft"
    hf = save_tiny_checkpoint(run_dir / "checkpoint_000010" / "hf_model")
    config = {"scaling.use_gpu": str(use_gpu), "deepspeed.precision": precision, "name": "tiny_draft"}
    (run_dir / "layerexit_mlflow.json").write_text(json.dumps({"run_id": "abc123", "config": config}))
    return hf


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_the_default_is_where_the_checkpoint_was_trained(tmp_path):
    cpu = trained_placement(str(_checkpoint(tmp_path / "a", use_gpu=False, precision="autocast_bf16")))
    assert (cpu.device, cpu.dtype, cpu.known) == ("cpu", "float32", True)  # fp32 weights, bf16 compute
    gpu = trained_placement(str(_checkpoint(tmp_path / "b", use_gpu=True, precision="auto")))
    assert (gpu.device, gpu.dtype) == ("cuda", "bfloat16") and "layerexit_mlflow.json" in gpu.source
    assert trained_placement(str(tmp_path)) == UNKNOWN  # a directory no training job wrote


def test_the_default_is_where_the_registered_model_was_trained(tmp_path, monkeypatch):
    """models:/name@alias -> the version's source run -> param scaling.use_gpu, tag layerexit.precision (what
    jobs/train_lite.py logs)."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    exp = client.create_experiment("layerexit-train")
    run = client.create_run(exp)
    client.log_param(run.info.run_id, "scaling.use_gpu", "True")
    client.set_tag(run.info.run_id, "layerexit.precision", "bf16")
    client.create_registered_model("layerexit-big")
    version = client.create_model_version("layerexit-big", str(tmp_path), run_id=run.info.run_id)
    client.set_registered_model_alias("layerexit-big", "trained", version.version)

    found = trained_placement("models:/layerexit-big@trained")
    assert (found.device, found.dtype, found.known) == ("cuda", "bfloat16", True)
    assert run.info.run_id in found.source
    assert trained_placement("models:/layerexit-big/1") == found
    assert trained_placement("models:/no-such-model@trained") == UNKNOWN  # the load that follows names it


def test_cuda_without_cuda_is_an_error_naming_device(tmp_path, no_cuda, capsys):
    hf = _checkpoint(tmp_path, use_gpu=False, precision="fp32")
    rc = main(["export-draft", str(hf), "--layer", "2", "--out", str(tmp_path / "d"), "--device", "cuda",
               "--measure", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "--device cuda" in err and "no CUDA device" in err and "--device cpu" in err
    assert not (tmp_path / "d").exists()


def test_a_gpu_trained_model_on_a_cpu_machine_asks_for_device(tmp_path, no_cuda):
    hf = _checkpoint(tmp_path, use_gpu=True, precision="bf16")
    with pytest.raises(ConfigError) as err:
        choose_placement(str(hf), None, None)
    assert "--device cuda" in err.value.problem and "trained on a GPU" in err.value.problem
    assert "--device cpu" in err.value.fix
    placement, note = choose_placement(str(hf), "cpu", None)  # the dtype still comes from training
    assert (placement.device, placement.dtype) == ("cpu", "bfloat16")
    assert "(--device)" in note and "bfloat16 (as trained)" in note


@pytest.mark.parametrize(("option", "value"), [("--device", "tpu"), ("--dtype", "int8")])
def test_unsupported_values_name_the_option(tmp_path, option, value, capsys):
    rc = main(["export-draft", "smollm2", "--layer", "2", "--out", str(tmp_path / "d"), option, value])
    err = capsys.readouterr().err
    assert rc == 2 and f"{option} {value!r} is not supported" in err


def test_export_loads_and_measures_in_the_chosen_dtype(tmp_path, capsys):
    """--device cpu with the trained dtype (bf16): the model is loaded in bf16, the agreement is measured on it and
    recorded with where it was measured, and the draft is saved in bf16; the note says where each came from."""
    from transformers import AutoModelForCausalLM

    hf = _checkpoint(tmp_path, use_gpu=True, precision="bf16")
    out = tmp_path / "draft"
    rc = main(["export-draft", str(hf), "--layer", "2", "--out", str(out), "--device", "cpu", "--measure", "2"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "device cpu (--device), dtype bfloat16 (as trained)" in captured.err
    report = json.loads(captured.out.strip().splitlines()[-1])
    assert report["agreement_measured_on"] == "cpu/bfloat16" and 0.0 <= report["agreement"] <= 1.0
    meta = json.loads((out / "layerexit_draft.json").read_text())
    assert meta["agreement_measured_on"] == "cpu/bfloat16"
    draft = AutoModelForCausalLM.from_pretrained(out)
    assert draft.config.num_hidden_layers == 2
    saved = json.loads((out / "config.json").read_text())
    assert (saved.get("dtype") or saved.get("torch_dtype")) == "bfloat16"


def test_unknown_origin_defaults_to_cpu_float32_with_a_note(tmp_path, capsys):
    from layerexit.models.tiny import save_tiny_checkpoint

    hf = save_tiny_checkpoint(tmp_path / "plain")
    out = tmp_path / "draft"
    assert main(["export-draft", str(hf), "--layer", "1", "--out", str(out), "--measure", "0"]) == 0
    err = capsys.readouterr().err
    assert "device cpu (default), dtype float32 (default)" in err and "is not recorded" in err
    assert "--device/--dtype" in err
    assert "agreement_measured_on" not in json.loads((out / "layerexit_draft.json").read_text())
