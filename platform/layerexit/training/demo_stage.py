"""The `make demo` training stage: a short run of the best CPU recipe (``jobs/configs/smollm2_adapters.yaml``: exit
adapters on the frozen SmolLM2, distilled from its top-64 final-layer distribution on cached hidden states) through
the real Ray Train + DeepSpeed path, printing every exit layer's agreement with the final layer before and after.

Called from ``layerexit.demo``: ``run_demo_training(console, out_dir)``. A few minutes on a 2-core CPU.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

DEMO_NAME = "demo_smollm2_adapters"


def demo_config(out_dir: str | Path, **overrides):
    """The demo's TrainConfig: smollm2_adapters.yaml's adapters recipe on 96 training instructions (greedy answers
    only), exits 8..28 step 4, ~70 steps of 256 cached positions (the demo must end within 20 minutes on a
    2-core CPU)."""
    from layerexit.training.config import TrainConfig

    out_dir = Path(out_dir).resolve()
    data = {
        "name": DEMO_NAME,
        "model": {"spec": "smollm2"},
        "recipe": "adapters",
        "data": {"source": "instructions", "max_train_examples": 96, "max_eval_examples": 16,
                 "distill_max_new_tokens": 48, "max_length": 192, "samples_per_instruction": 0},
        "lite": {"exit_layers": [8, 12, 16, 20, 24, 28], "weights": "uniform"},
        "distill": {"top_k": 64, "temperature": 1.0, "full_every": 8, "chunk_size": 512},
        "adapters": {"rank": 256, "positions_per_batch": 256},
        "optim": {"lr": 3.0e-3, "warmup_steps": 10, "schedule": "cosine", "min_lr_ratio": 0.1,
                  "micro_batch_size": 4, "grad_accum": 1, "epochs": 10},
        # auto: bf16 autocast where the CPU has native bf16, fp32 elsewhere (an AVX2-only CPU trains ~30x slower
        # in bf16: the demo must finish there too); the teacher cache's forward likewise (distill.cache_precision).
        "deepspeed": {"zero_stage": 2, "precision": "auto"},
        "scaling": {"num_workers": 2, "use_gpu": False, "cpus_per_worker": 1},
        "checkpoint": {"storage_path": str(out_dir / "ray_results"), "num_to_keep": 1, "max_failures": 0},
        "mlflow": {"experiment": "layerexit-demo", "log_system_metrics": False},
        "eval": {"at_start": True, "alignment_prompts": 16, "alignment_max_new_tokens": 32},
    }
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        if field:
            data.setdefault(section, {})[field] = value
        else:
            data[section] = value
    return TrainConfig.model_validate(data)


def run_demo_training(console, out_dir: str | Path = "outputs/demo", **overrides) -> dict:
    """Train briefly and print before/after alignment for layers 8..28; returns the numbers and where things went.

    ``overrides`` are ``section.key=value`` settings on top of ``demo_config`` (tests shrink the run with them).
    """
    from rich.table import Table

    from layerexit.training.ray_trainer import run_training

    t0 = time.time()
    cfg = demo_config(out_dir, **overrides)
    run_dir = cfg.storage_dir() / cfg.name
    if run_dir.exists():
        shutil.rmtree(run_dir)  # the demo always trains from the base model
    console.rule("3. Exit adapters on the frozen model, distilled on Ray Train + DeepSpeed (short run)")
    result = run_training(cfg, console=console, show_progress=True)
    layers = [l for l in cfg.lite.exit_layers if l in result.alignment_after]
    table = Table(title="Alignment with the final layer on held-out prompts (share of tokens)")
    table.add_column("layer", justify="right")
    table.add_column("before", justify="right")
    table.add_column(f"after ({cfg.recipe})", justify="right")
    for l in layers:
        table.add_row(str(l), f"{result.alignment_before.get(l, float('nan')):.0%}", f"{result.alignment_after[l]:.0%}")
    console.print(table)
    final = max(result.eval_loss_after) if result.eval_loss_after else None
    if final is not None and final in result.eval_loss_before:
        console.print(f"final layer {final}: held-out loss on the base model's own answers "
                      f"{result.eval_loss_before[final]:.3f} before, {result.eval_loss_after[final]:.3f} after "
                      f"(the base model is frozen: its final layer is unchanged by construction)")
    console.print(f"checkpoint: {result.hf_model_dir} (the base model, loads with transformers' from_pretrained; "
                  "exit_adapters/ beside it is attached by layerexit's loader)")
    console.print(f"MLflow run {result.run_id} in {result.tracking_uri}; `mlflow ui` shows per-exit losses, "
                  "alignment curves and the registered model")
    return {
        "alignment_before": {l: result.alignment_before.get(l) for l in layers},
        "alignment_after": {l: result.alignment_after[l] for l in layers},
        "eval_loss_before": result.eval_loss_before,
        "eval_loss_after": result.eval_loss_after,
        "hf_model_dir": str(result.hf_model_dir),
        "run_id": result.run_id,
        "tracking_uri": result.tracking_uri,
        "seconds": time.time() - t0,
    }
