"""LITE training on a real Ray cluster with DeepSpeed (CPU, gloo) and MLflow, on a tiny model.

- 2 workers, ZeRO-2: the loss falls, the checkpoint loads in plain transformers, MLflow holds per-exit metrics,
  the model is registered; running the same name again resumes from the latest checkpoint.
- LITE vs final_only on the same data: the intermediate exits' held-out loss is lower with LITE.
- A worker SIGKILLed mid-run: Ray Train restarts the group from the latest checkpoint and the run finishes.
- `ray start --head` on free ports + `ray job submit` of jobs/train_lite.py: the job SUCCEEDS; the cluster is
  stopped afterwards.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from layerexit.config import file_vocabulary

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_local():
    import ray

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, log_to_driver=True)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A tiny 4-layer model, an Alpaca-format dataset with a learnable pattern, a place for runs."""
    from layerexit.models.tiny import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("train")
    save_tiny_checkpoint(root / "tiny", num_layers=4)
    rng = random.Random(0)
    words = ["sea", "sky", "fox", "dog", "tree", "sun", "moon", "star"]
    with open(root / "data.jsonl", "w") as fh:
        for _ in range(120):
            a, b = rng.choice(words), rng.choice(words)
            fh.write(json.dumps({"instruction": f"Repeat the words {a} and {b}.", "input": "",
                                 "output": f"{a} {b} {a} {b} {a} {b}."}) + "\n")
    return root


def tiny_config(workdir: Path, name: str, **sections) -> dict:
    cfg = {
        "name": name,
        "model": {"spec": str(workdir / "tiny")},
        "data": {"source": "alpaca", "path": str(workdir / "data.jsonl"), "template": "chat", "max_length": 64,
                 "eval_fraction": 0.2, "max_eval_examples": 16},
        "lite": {"exit_layers": [1, 2, 3], "weights": "uniform", "chunk_size": 32},
        "optim": {"lr": 3e-3, "warmup_steps": 1, "schedule": "constant", "micro_batch_size": 4, "epochs": 1,
                  "max_steps": 8},
        "deepspeed": {"zero_stage": 2, "precision": "fp32"},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
        "checkpoint": {"storage_path": str(workdir / "ray_results"), "every_steps": 4, "max_failures": 1},
        "mlflow": {"tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}", "experiment": "test-train",
                   "log_system_metrics": False},
        "eval": {"alignment_prompts": 4, "alignment_max_new_tokens": 6},
    }
    for key, value in sections.items():
        section, _, field = key.partition("__")
        cfg[section][field] = value
    return cfg


def train(cfg: dict):
    from layerexit.training import TrainConfig
    from layerexit.training.ray_trainer import run_training

    return run_training(TrainConfig.model_validate(cfg), show_progress=False)


def history(result, key: str) -> list[float]:
    from mlflow import MlflowClient

    hist = MlflowClient(tracking_uri=result.tracking_uri).get_metric_history(result.run_id, key)
    return [m.value for m in sorted(hist, key=lambda m: (m.step, m.timestamp))]


@pytest.fixture(scope="module")
def lite_run(ray_local, workdir):
    return train(tiny_config(workdir, "tiny_lite"))


def test_two_workers_zero2_train_checkpoint_track_resume(lite_run, workdir, recount_alignment):
    import mlflow
    import torch
    from mlflow import MlflowClient
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layerexit.tracking import hf_dir_from_model_uri

    res = lite_run
    # The loss falls, at every exit, on training and held-out data.
    train_loss = history(res, "train/loss")
    assert len(train_loss) == 8 and train_loss[-1] < train_loss[0] - 0.5
    for l in (1, 2, 3, 4):
        ev = history(res, f"eval/loss_l{l:02d}")
        assert len(ev) == 2 and ev[1] < ev[0]  # evaluated before the first step and at the end
    client = MlflowClient(tracking_uri=res.tracking_uri)
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for key in ("train/loss_l01", "train/loss_l02", "train/loss_l03", "train/loss_l04", "eval/loss", "lr",
                "tokens_per_s", "align/l01", "align/l03", "conf/l02"):
        assert key in metrics, key
    assert run.data.params["lite.exit_layers"] == "[1, 2, 3]" and run.data.params["deepspeed.zero_stage"] == "2"
    artifacts = [a.path for a in client.list_artifacts(res.run_id, "alignment")]
    assert any(a.endswith(".png") for a in artifacts)
    assert res.alignment_before.keys() == {1, 2, 3, 4}
    # The alignment the run reports for each exit is the trained model's: recounted here from the saved weights on
    # the run's own held-out prompts (each of the 2 ranks' share generated as that rank did), exit against final.
    recount = recount_alignment(res, tiny_config(workdir, "tiny_lite"), world=2)
    for layer in (1, 2, 3):
        assert res.alignment_after[layer] == pytest.approx(recount.row(layer).alignment), layer

    # The checkpoint is a plain Hugging Face directory (plus DeepSpeed's state) that transformers loads.
    assert res.checkpoint_dir.name == "checkpoint_000008" and (res.checkpoint_dir / "COMPLETE").is_file()
    assert (res.checkpoint_dir / "deepspeed" / "latest").is_file()
    trained = AutoModelForCausalLM.from_pretrained(res.hf_model_dir)
    tok = AutoTokenizer.from_pretrained(res.hf_model_dir)
    start = AutoModelForCausalLM.from_pretrained(workdir / "tiny")
    ids = torch.tensor([tok("Repeat the words sea and sky.")["input_ids"]])
    assert not torch.allclose(trained(ids).logits, start(ids).logits)  # trained weights, not the start
    # ... and is registered in MLflow under the alias, resolving to the same weights.
    mlflow.set_tracking_uri(res.tracking_uri)
    assert res.registered["registered_name"] == "layerexit-tiny_lite" and res.registered["alias"] == "trained"
    version = client.get_model_version_by_alias("layerexit-tiny_lite", "trained")
    assert version.run_id == res.run_id
    logged = AutoModelForCausalLM.from_pretrained(hf_dir_from_model_uri("models:/layerexit-tiny_lite@trained"))
    assert torch.allclose(logged(ids).logits, trained(ids).logits)

    # Same name + storage: the run resumes from the latest checkpoint into the same MLflow run.
    more = train(tiny_config(workdir, "tiny_lite", optim__max_steps=10))
    assert more.metrics["resumed_from_step"] == 8 and more.metrics["step"] == 10
    assert more.run_id == res.run_id and more.checkpoint_dir.name == "checkpoint_000010"
    assert len(history(more, "train/loss")) == 10  # steps 9 and 10 were added, 1..8 not repeated


def test_lite_beats_final_only_on_intermediate_exits(lite_run, workdir):
    base = train(tiny_config(workdir, "tiny_final_only", lite__weights="final_only", eval__alignment_prompts=0,
                             mlflow__register_model=False))
    for l in (1, 2, 3):
        # [1]: after step 8 in both runs (the LITE run may since have been resumed to step 10).
        lite_l, it_l = history(lite_run, f"eval/loss_l{l:02d}")[1], history(base, f"eval/loss_l{l:02d}")[1]
        assert lite_l < it_l, (l, lite_l, it_l)
    # Only the final layer was trained in the baseline.
    assert "train/loss_l01" not in base.metrics and "train/loss_l04" in base.metrics


def test_worker_killed_mid_run_resumes_from_checkpoint(ray_local, workdir, monkeypatch):
    marker = workdir / "fault_fired"
    monkeypatch.setenv("LAYEREXIT_FAULT_STEP", "3")
    monkeypatch.setenv("LAYEREXIT_FAULT_MARKER", str(marker))
    monkeypatch.setenv("LAYEREXIT_FAULT_RANK", "1")
    res = train(tiny_config(workdir, "tiny_fault", checkpoint__every_steps=2, optim__max_steps=6,
                            eval__alignment_prompts=0, mlflow__register_model=False))
    assert marker.is_file()  # rank 1 really was SIGKILLed at step 3
    assert res.metrics["step"] == 6 and res.metrics["resumed_from_step"] == 2
    assert history(res, "resumed_from_step") == [2.0]
    assert (res.hf_model_dir / "config.json").is_file()


def test_crash_without_retries_marks_mlflow_run_failed(ray_local, workdir, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("LAYEREXIT_FAULT_STEP", "1")
    monkeypatch.setenv("LAYEREXIT_FAULT_MARKER", str(workdir / "fault_fired_2"))
    monkeypatch.setenv("LAYEREXIT_FAULT_DELAY_S", "0")
    cfg = tiny_config(workdir, "tiny_crash", checkpoint__max_failures=0, optim__max_steps=3,
                      eval__at_start=False, mlflow__register_model=False)
    with pytest.raises(Exception):  # noqa: B017 - Ray's TrainingFailedError family
        train(cfg)
    mlc = MlflowClient(tracking_uri=cfg["mlflow"]["tracking_uri"])
    runs = mlc.search_runs([mlc.get_experiment_by_name("test-train").experiment_id],
                           "attributes.run_name = 'tiny_crash'")
    assert len(runs) == 1 and runs[0].info.status == "FAILED"


# ----------------------------------------------------------------------------------------------- ray job submit


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_ray_job_submit_succeeds_and_cluster_stops(workdir):
    gcs, dash, client, agent, agent_grpc, runtime_env, metrics, node_mgr, obj_mgr = _free_ports(9)
    temp = Path(tempfile.mkdtemp(prefix="lxr", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}", "DS_ACCELERATOR": "cpu",
           "RAY_USAGE_STATS_ENABLED": "0"}
    # `ray start` turns token auth on by itself when a token exists (~/.ray/auth_token), but the job CLI sends the
    # token only when the mode is set: set the same mode for both.
    has_token = (Path.home() / ".ray" / "auth_token").is_file() or any(
        k in os.environ for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"))
    env["RAY_AUTH_MODE"] = "token" if has_token else "disabled"
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=4",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
         f"--metrics-export-port={metrics}", f"--node-manager-port={node_mgr}",
         f"--object-manager-port={obj_mgr}", f"--temp-dir={temp}", "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 300  # CLI start-up alone takes seconds on a busy 2-core machine
        while True:
            probe = subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", address], env=env,
                                   capture_output=True, text=True)
            if probe.returncode == 0:
                break
            assert head.poll() is None, head.stdout.read()
            assert time.time() < deadline, f"the Ray head did not come up: {probe.stderr[-1000:]}"
            time.sleep(2)
        cfg = tiny_config(workdir, "tiny_job", optim__max_steps=4, checkpoint__every_steps=None,
                          eval__alignment_prompts=2)
        cfg["mlflow"]["tracking_uri"] = f"sqlite:///{workdir / 'job_mlflow.db'}"
        config_path = workdir / "tiny_job.yaml"
        config_path.write_text(yaml.safe_dump(file_vocabulary(cfg)))  # model: <spec> at the top level
        submit = subprocess.run(
            [str(VENV_BIN / "ray"), "job", "submit", "--address", address, "--submission-id", "layerexit-tiny-job",
             "--working-dir", str(REPO), "--", "python", "jobs/train_lite.py", "--config", str(config_path)],
            env=env, capture_output=True, text=True, timeout=900)
        status = subprocess.run([str(VENV_BIN / "ray"), "job", "status", "--address", address,
                                 "layerexit-tiny-job"], env=env, capture_output=True, text=True)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-2000:]
        assert "succeeded" in (status.stdout + status.stderr).lower(), status.stdout + status.stderr
        from mlflow import MlflowClient

        mlc = MlflowClient(tracking_uri=cfg["mlflow"]["tracking_uri"])
        runs = mlc.search_runs([mlc.get_experiment_by_name("test-train").experiment_id],
                               "attributes.run_name = 'tiny_job'")
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        assert "train/loss_l02" in runs[0].data.metrics
        ckpt = workdir / "ray_results" / "tiny_job" / "checkpoint_000004"
        assert (ckpt / "hf_model" / "model.safetensors").is_file() and (ckpt / "COMPLETE").is_file()
    finally:
        head.terminate()  # `ray start --block` tears its cluster down when it exits
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)
    deadline = time.time() + 30
    while _listening(gcs) and time.time() < deadline:
        time.sleep(1)
    assert not _listening(gcs) and not _listening(dash)  # the cluster is stopped
