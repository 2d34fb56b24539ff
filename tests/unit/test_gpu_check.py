"""The prepared device check (benchmarks/gpu_check.py) is ready for a lent GPU: the LITE setting it runs is the one
the MFU sweep's own model favours, its CPU dry run (tiny LLaMA, the same code paths: each part in its own process,
the job's DeepSpeed config and objectives, the compiled engine) writes one JSON with real numbers for every part,
and a part that fails or runs out of time is recorded while the others still report. No GPU here: the numbers
mean nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(REPO / "benchmarks"))

H100_BYTES = 81559 * 2**20  # nvidia-smi's memory.total of an H100 80GB HBM3
H200_BYTES = 143771 * 2**20


def _dry_run(tmp_path: Path, *extra: str, timeout: int = 850) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)
    assert out.exists(), proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_the_lite_setting_is_the_sweeps_favoured_one() -> None:
    from gpu_check import rank_lite_settings, scale_exits

    for gpu, layers in ((H100_BYTES, 16), (H200_BYTES, 32)):  # gpu_zero3_7b's depth rule: 16 bytes per parameter
        ranked = rank_lite_settings("7b", gpu)
        best = ranked[0]
        assert (best["zero_stage"], best["batch"], best["seq"], best["chunk"]) == (2, 16, 1024, 512)
        assert best["layers"] == layers and best["fits_headroom"]
        assert ranked[1]["zero_stage"] == 2 and ranked[1]["tokens_per_step"] == 16 * 1024  # 8 x 2048: the fallback
        assert {r["zero_stage"] for r in ranked[-2:]} == {3}
    assert scale_exits([4, 8, 12], 32, 32) == [4, 8, 12]
    assert scale_exits([4, 8, 12], 32, 4) == [1, 2]


def test_after_an_out_of_memory_the_lite_part_tries_fewer_tokens_per_step(monkeypatch) -> None:
    import argparse

    import gpu_check

    calls = []

    def fake_run_setting(shape, stage, batch, seq, chunk, steps, timeout_s):
        calls.append((stage, batch, seq))
        if batch * seq >= 16 * 1024:
            return {"zero_stage": stage, "batch": batch, "seq": seq, "chunk": chunk, "error": "out of memory"}
        return {"zero_stage": stage, "batch": batch, "seq": seq, "chunk": chunk, "tokens_per_s": 1000.0, "mfu": 0.3}

    monkeypatch.setattr(gpu_check, "run_setting", fake_run_setting)
    args = argparse.Namespace(fail=None, dry_run=False, lite_steps=3)
    result = gpu_check.lite_part(args, 300.0, {"gpu_bytes": H100_BYTES}, lambda data: None)
    assert calls == [(2, 16, 1024), (2, 8, 1024)]  # 8 x 2048 (as many tokens as the one that ran out) is skipped
    assert result["setting"]["name"] == "ZeRO-2 8x1024 chunk 512" and not result["setting"]["ranked_first"]
    assert result["tokens_per_s"] == 1000.0 and [a.get("error") for a in result["attempts"]] == ["out of memory", None]


def test_a_part_that_raises_in_this_process_is_recorded(tmp_path: Path) -> None:
    from gpu_check import main

    out = tmp_path / "check.json"
    assert main(["--dry-run", "--parts", "lite", "--fail", "lite", "--out", str(out)]) == 1
    report = json.loads(out.read_text())
    lite = report["parts"]["lite"]
    assert lite["status"] == "error" and "forced failure" in lite["error"] and lite["log_tail"]
    assert report["parts"]["draft"]["status"] == report["parts"]["engine"]["status"] == "skipped"
    assert report["finished"] is True


@pytest.mark.slow
def test_dry_run_reports_every_part(tmp_path: Path) -> None:
    proc, report = _dry_run(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report["finished"] is True and report["dry_run"] is True
    parts = report["parts"]
    assert {name: p["status"] for name, p in parts.items()} == {"lite": "ok", "draft": "ok", "engine": "ok"}

    lite = parts["lite"]
    assert lite["tokens_per_s"] > 0 and lite["setting"]["name"] == "ZeRO-2 4x64 chunk 32"
    assert lite["setting"]["ranked_first"] and "ZeRO-2 before ZeRO-3" in lite["choice"]["rule"]
    assert lite["mfu"] is None  # no peak for a CPU

    draft = parts["draft"]
    assert draft["config"] == "jobs/configs/llama2_7b_draft.yaml"
    assert draft["adapters"]["kind"] == "decoder_layer" and draft["exits"] == [1, 2]
    assert draft["step_s_median"] > 0 and draft["tokens_per_s"] > 0 and draft["trainable_params"] > 0

    rows = parts["engine"]["rows"]
    assert [(r["name"], r["batch"]) for r in rows] == [
        (name, b) for b in (1, 8) for name in ("hf-generate", "compiled-final", "eager-final")]
    assert all(r["tokens_per_s"] > 0 and "error" not in r for r in rows), rows
    for r in (r for r in rows if r["name"] == "compiled-final"):
        assert r["compiled_off"] is None, r  # the compiled path ran
        for key in ("cuda_graph_recordings_warmup", "cuda_graph_rerecords_timed", "cuda_graph_unexpected_rerecords",
                    "cuda_graph_skips", "dynamo_graphs_warmup", "dynamo_graphs_timed"):
            assert type(r[key]) is int and r[key] >= 0, (key, r)
        assert r["cuda_graph_recordings_warmup"] == r["cuda_graph_rerecords_timed"] == 0  # a CPU has no CUDA graphs
    assert rows[1]["dynamo_graphs_warmup"] >= 1  # batch 1 compiled something
    summary = report["summary"]
    assert summary["lite"]["setting"] == lite["setting"]["name"]
    assert set(summary["engine"]) == {"batch_1", "batch_8"}
    assert all(type(b["cuda_graph_rerecords_timed"]) is int for b in summary["engine"].values())


@pytest.mark.slow
def test_a_failing_part_is_recorded_and_the_others_still_report(tmp_path: Path) -> None:
    proc, report = _dry_run(tmp_path, "--parts", "lite,engine", "--fail", "engine")
    assert proc.returncode == 1
    parts = report["parts"]
    assert parts["engine"]["status"] == "error" and "forced failure" in parts["engine"]["error"]
    assert any("forced failure" in line for line in parts["engine"]["log_tail"])  # the child's traceback
    assert parts["lite"]["status"] == "ok" and parts["lite"]["tokens_per_s"] > 0
    assert parts["draft"]["status"] == "skipped"


@pytest.mark.slow
def test_a_part_past_its_budget_is_stopped_and_recorded(tmp_path: Path) -> None:
    proc, report = _dry_run(tmp_path, "--parts", "engine", "--budget-s", "8", timeout=120)
    assert proc.returncode == 1
    engine = report["parts"]["engine"]
    assert engine["status"] == "timeout" and engine["wall_s"] < 30, engine
    assert report["finished"] is True
