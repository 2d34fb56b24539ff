"""The GPU MFU device check (benchmarks/gpu_mfu_7b.py) is ready to run on a lent GPU: its FLOP count is the
documented one, and its whole code path (each setting in its own process, the job's ZeRO config, optimizer and
LITE objective, JSON out) runs on CPU with the tiny shape. No GPU here: the numbers mean nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))


def test_flops_per_token_of_the_7b_lite_step() -> None:
    from gpu_zero3_7b import SHAPES, exit_layers, peak_tflops, train_flops_per_token

    shape = SHAPES["7b"]
    flops = train_flops_per_token(shape, 32, 512, extra_heads=len(exit_layers(32)))
    h, i, v = 4096, 11008, 32000
    by_hand = 6 * (32 * (4 * h * h + 3 * h * i) + h * v) + 6 * 32 * h * 512 + 6 * h * v * 6
    assert flops == by_hand and 44e9 < flops < 45.5e9
    assert 1734 * flops / (peak_tflops("NVIDIA H200") * 1e12) == pytest.approx(0.078, abs=0.002)
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0 and peak_tflops("NVIDIA H100 80GB HBM3") == 989.4


@pytest.mark.slow
def test_mfu_sweep_runs_its_settings_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "mfu.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_mfu_7b.py"), "--shape", "tiny",
                           "--budget-s", "400", "--per-run-s", "200", "--steps", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["zero_stage"] for r in result["rows"]] == [3, 2]
    assert all(r["tokens_per_s"] > 0 and r["mfu"] is None for r in result["rows"]), result["rows"]
    assert result["best"] is not None and result["met"] is False
