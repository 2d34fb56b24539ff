"""Driver-side checks for training at scale, before any worker starts: the host-memory plan of the chosen path
(a full copy per rank vs ZeRO-3 sharded construction) and the resume plan for a checkpoint written by another
number of ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from layerexit.errors import ConfigError
from layerexit.training import TrainConfig
from layerexit.training.rank_memory import (
    check_host_memory, check_training_memory, model_param_count, plan_host_memory, rank_param_bytes,
)
from layerexit.training.resume import plan_resume

GIB = 2**30
LLAMA_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                 num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096)


def test_plan_prices_a_full_copy_per_rank_and_a_sharded_one() -> None:
    p13 = 13_015_864_320
    full = plan_host_memory(p13, world=8, zero_stage=2, precision="bf16", use_gpu=True, teacher=False)
    assert full.per_rank_bytes == 2 * p13 and not full.sharded  # 26 GB of bf16 weights per rank while loading
    teacher = plan_host_memory(p13, world=8, zero_stage=2, precision="bf16", use_gpu=True, teacher=True)
    assert teacher.per_rank_bytes == 4 * p13
    sharded = plan_host_memory(p13, world=8, zero_stage=3, precision="bf16", use_gpu=True, teacher=True)
    assert sharded.per_rank_bytes == 0 and sharded.sharded  # zero.Init builds each shard on the GPU
    cpu = plan_host_memory(1_000_000, world=4, zero_stage=3, precision="fp32", use_gpu=False, teacher=False)
    assert cpu.weight_bytes == 1_000_000  # 4 bytes / 4 ranks
    assert cpu.state_bytes == 8_000_000 // 4 + 4_000_000 // 4  # Adam moments and gradients, sharded


def test_check_names_the_field_and_the_fix() -> None:
    plan = plan_host_memory(13_000_000_000, world=8, zero_stage=2, precision="bf16", use_gpu=True, teacher=True)
    with pytest.raises(ConfigError) as err:
        check_host_memory(plan, ranks_per_node=8, available_bytes=256 * GIB, zero_stage=2, teacher=True)
    text = str(err.value)
    assert text.startswith("deepspeed.zero_stage") and "zero_stage: 3" in text and "anchor_weight: 0" in text
    assert "8 rank(s) per node" in text
    check_host_memory(plan, ranks_per_node=1, available_bytes=256 * GIB, zero_stage=2, teacher=True)
    check_host_memory(plan, ranks_per_node=8, available_bytes=None, zero_stage=2, teacher=True)  # unknown: no check


def test_a_70b_model_on_a_full_copy_path_stops_before_workers(tmp_path: Path) -> None:
    """A LLaMA-2-70B-shaped config (config.json only: counted on the meta device, no weights read)."""
    from transformers import LlamaConfig

    LlamaConfig(**LLAMA_70B).save_pretrained(tmp_path / "llama70b")
    assert 68e9 < model_param_count(tmp_path / "llama70b") < 70e9
    nodes = [{"Alive": True, "Resources": {"memory": 900 * GIB, "GPU": 8.0}}]
    base = {"name": "big", "model": {"spec": str(tmp_path / "llama70b")}, "lite": {"exit_layers": [20, 40]},
            "optim": {"micro_batch_size": 1}, "deepspeed": {"zero_stage": 2, "precision": "bf16"},
            "scaling": {"num_workers": 8, "use_gpu": True}}
    with pytest.raises(ConfigError, match="deepspeed.zero_stage"):
        check_training_memory(TrainConfig.model_validate(base), nodes)
    sharded = TrainConfig.model_validate({**base, "deepspeed": {"zero_stage": 3, "precision": "bf16"}})
    assert check_training_memory(sharded, nodes).per_rank_bytes == 0


def test_rank_param_bytes_and_peak_rss_measure() -> None:
    """The peak is caught even though the block is freed before the sampler's last look. In a fresh process: one
    that has freed memory before may reuse it without its RSS growing."""
    import subprocess
    import sys

    import torch

    layer = torch.nn.Linear(256, 256)
    assert rank_param_bytes(layer) == (256 * 256 + 256) * 4
    code = ("import time, torch\n"
            "from layerexit.training.rank_memory import PeakRss\n"
            "with PeakRss() as peak:\n"
            "    block = torch.ones(64 * 2**20 // 4)\n"  # 64 MiB, touched
            "    time.sleep(0.05)\n"
            "    del block\n"
            "print(peak.peak_delta_bytes)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert int(out.stdout.split()[-1]) > 48 * 2**20


def _run_dir(tmp_path: Path, world: int, shards: int) -> TrainConfig:
    cfg = TrainConfig.model_validate({"name": "r", "model": {"spec": "tiny"}, "lite": {"exit_layers": [1]},
                                      "optim": {"micro_batch_size": 2},
                                      "scaling": {"num_workers": 1},
                                      "checkpoint": {"storage_path": str(tmp_path)}})
    run = tmp_path / "r"
    ckpt = run / "checkpoint_000004"
    (ckpt / "deepspeed" / "state").mkdir(parents=True)
    for r in range(shards):
        (ckpt / "deepspeed" / "state" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"x")
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 4, "epoch": 0, "examples_in_epoch": 32,
                                                        "world_size": world}))
    (ckpt / "COMPLETE").write_text("ok\n")
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        {"latest_checkpoint_result": {"checkpoint_dir_name": ckpt.name}}))
    return cfg


def test_resume_plan_fresh_same_world_and_a_shard_missing(tmp_path: Path) -> None:
    cfg = TrainConfig.model_validate({"name": "fresh", "model": {"spec": "tiny"}, "lite": {"exit_layers": [1]},
                                      "checkpoint": {"storage_path": str(tmp_path)}})
    assert plan_resume(cfg, None).checkpoint is None
    same = _run_dir(tmp_path / "a", world=1, shards=1)
    plan = plan_resume(same, {"scaling.num_workers": 1})
    assert plan.step == 4 and not plan.reshard
    broken = _run_dir(tmp_path / "b", world=2, shards=1)  # 2 ranks wrote it, one shard is missing
    with pytest.raises(ConfigError) as err:
        plan_resume(broken, {"scaling.num_workers": 2, "optim.micro_batch_size": 2, "optim.grad_accum": 1})
    assert str(err.value).startswith("scaling.num_workers") and "written by 2 rank(s)" in str(err.value)
    assert err.value.fix.startswith("set scaling.num_workers: 2")
    assert not (tmp_path / "b" / "r" / "checkpoint_000004" / "deepspeed" / "state_universal").exists()


def test_a_teacher_that_does_not_fit_on_the_gpus_is_named() -> None:
    """LLaMA-2-13B, bf16, 8 x H100 80 GB, ZeRO-2 with the anchor teacher: the model's state fits, the full teacher
    beside it does not -> lite.anchor_weight; ZeRO-3 shards both and passes; ZeRO-2 without a teacher passes."""
    from layerexit.training.rank_memory import check_gpu_memory, gpu_memory_bytes, plan_gpu_memory

    p13 = 13_015_864_320
    nodes = [{"Alive": True, "Resources": {"GPU": 8.0, "accelerator_type:H100": 1.0, "memory": 1500 * GIB}}]
    gpu = gpu_memory_bytes(nodes)
    assert gpu == ("H100", 80 * 10**9)
    kw = dict(zero_stage=2, offload_optimizer=False)
    with pytest.raises(ConfigError) as err:
        check_gpu_memory(plan_gpu_memory(p13, world=8, teacher=True, **kw), gpu, teacher=True, **kw)
    assert str(err.value).startswith("lite.anchor_weight") and "teacher 24.2" in str(err.value)
    check_gpu_memory(plan_gpu_memory(p13, world=8, teacher=False, **kw), gpu, teacher=False, **kw)
    z3 = dict(zero_stage=3, offload_optimizer=False)
    check_gpu_memory(plan_gpu_memory(p13, world=8, teacher=True, **z3), gpu, teacher=True, **z3)
    with pytest.raises(ConfigError, match="deepspeed.zero_stage"):  # one GPU, ZeRO-2: 16 bytes/param > 80 GB
        check_gpu_memory(plan_gpu_memory(p13, world=1, teacher=False, **kw), gpu, teacher=False, **kw)
    assert gpu_memory_bytes([{"Alive": True, "Resources": {"accelerator_type:A100": 1.0}}]) is None  # 40 or 80 GB
