"""The threshold-search stage of ``make demo``: a small search whose result the demo then serves."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def demo_config(model_spec: str, out_dir: str | Path, num_trials: int = 8, num_layers: int | None = None,
                validation_prompts: int = 8, max_new_tokens: int = 24, report_prompts: int = 0,
                quality_metric: str = "spacy", min_quality: float = 0.9, mlflow: bool = True):
    """A TuneSearchConfig sized for the demo (a handful of trials, a few prompts, no held-out stage by default)."""
    from layerexit.engine.thresholds import map_preset
    from layerexit.tuning.config import TuneSearchConfig

    if num_layers is None:
        num_layers = _num_layers(model_spec)
    exits = sorted(l for l in map_preset("paper-7b", num_layers) if l < num_layers)
    return TuneSearchConfig.model_validate({
        "model": {"spec": model_spec, "device": "auto"},
        "space": {"exit_layers": exits, "threshold_range": [0.5, 1.0], "non_increasing": True,
                  "optional_layers": True},
        "quality": {"metric": quality_metric, "min": min_quality},
        "search": {"algorithm": "optuna", "num_trials": num_trials, "max_concurrent": 2, "verbose": 0,
                   "seed_presets": ["paper-7b"]},
        "prompts": {"validation": {"split": "train", "limit": validation_prompts},
                    "report": {"split": "heldout", "limit": report_prompts},
                    "max_new_tokens": max_new_tokens, "batch_size": 4},
        "confirm": {"top_k": 2, "batch_size": 1},
        "reference": {"presets": ["paper-7b"], "classifier": True},
        "mlflow": {"enabled": mlflow, "experiment": "layerexit-tune", "run_name": "demo-tune"},
        "output_dir": str(out_dir),
        "show_progress": False,
    })


def _num_layers(model_spec: str) -> int:
    from transformers import AutoConfig

    from layerexit.models.loading import resolve_model

    return int(AutoConfig.from_pretrained(resolve_model(model_spec).location).num_hidden_layers)


def run_demo_tuning(console, model_spec: str, out_dir: str | Path, num_trials: int = 8, **overrides: Any) -> dict:
    """Run the demo's small search and return what serving needs.

    Returns ``{"thresholds": {layer: thr}, "user_config": {...}, "constraint_met": bool, "chosen": {...},
    "best_tuned": {...}, "files": {...}, "seconds": {...}, "notes": [...]}``. ``user_config`` is the block a Serve
    deployment takes (policy final when no tuned set saves FLOPs at the required quality). Extra keyword arguments go
    to ``demo_config`` (validation_prompts, max_new_tokens, report_prompts, quality_metric, min_quality, mlflow).
    A missed quality minimum does not raise: ``constraint_met`` is False and the best found is returned.
    """
    from layerexit.tuning.search import run_tuning

    cfg = demo_config(model_spec, out_dir, num_trials, **overrides)
    console.rule(f"threshold search ({num_trials} trials on traces, Ray Tune + Optuna)")
    outcome = run_tuning(cfg, console=console)
    s = outcome.summary()
    console.print(f"Pareto front: {s['files']['pareto_png']}")
    if not outcome.constraint_met:
        console.print(f"[yellow]quality minimum not met[/]; serving the best found: {s['user_config']}")
    return {"thresholds": outcome.thresholds, "user_config": outcome.user_config,
            "constraint_met": outcome.constraint_met, "chosen": s["chosen"], "best_tuned": s["best_tuned"],
            "files": s["files"], "seconds": s["seconds"], "notes": s["notes"]}
