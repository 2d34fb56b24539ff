"""The `make demo` drafting stage end to end on the tiny model: decoder-layer adapters trained on Ray Train +
DeepSpeed, the draft chosen and shipped with the registered model, then lossless drafting timed against compiled
`final` on the same prompts (tokens equal in fp32... here bf16 on a random model, so only the plumbing is checked:
the shipped settings are used and the table's figures are real measurements)."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_draft_stage_trains_chooses_and_times_the_shipped_draft(tmp_path, tiny_dir, monkeypatch):
    from rich.console import Console

    from layerexit.training.draft_demo_stage import run_demo_drafting

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = run_demo_drafting(
        Console(quiet=True), tmp_path / "draft", prompts=2, max_new_tokens=8,
        model={"spec": str(tiny_dir)},
        data={"source": "instructions", "max_train_examples": 16, "max_eval_examples": 4,
              "distill_max_new_tokens": 8, "max_length": 64, "samples_per_instruction": 0},
        lite={"exit_layers": [1, 2], "weights": "uniform"},
        optim={"lr": 3e-3, "warmup_steps": 1, "schedule": "constant", "micro_batch_size": 2, "epochs": 1,
               "max_steps": 3},
        distill={"top_k": 8, "full_every": 4, "chunk_size": 64, "cache_precision": "fp32", "cache_tasks": 1},
        eval={"at_start": False, "alignment_prompts": 2, "alignment_max_new_tokens": 4},
        draft={"choose": True, "max_layer": 2, "max_draft": 2, "prompts": 2, "max_new_tokens": 6, "vocab_size": 64},
        deepspeed={"zero_stage": 2, "precision": "fp32"},
        mlflow={"experiment": "layerexit-demo", "log_system_metrics": False},
    )
    assert out["draft_settings"]["layer"] in (1, 2) and out["draft_settings"]["draft_vocab"]
    assert out["final_tokens_per_s"] > 0 and out["draft_tokens_per_s"] > 0
    assert out["speedup_vs_compiled_final"] == pytest.approx(out["draft_tokens_per_s"] / out["final_tokens_per_s"])
