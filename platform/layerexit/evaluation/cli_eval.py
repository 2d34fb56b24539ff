"""``layerexit eval`` / ``jobs/evaluate.py`` without the CLI framework: build the EvalConfig, run, print.

The console script wires ``eval_command`` to options; user errors are ``LayerexitError`` (one line, exit 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from layerexit.config import apply_overrides, load_config, validate_config
from layerexit.evaluation.config import EvalConfig, default_methods


def build_eval_config(
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    model: str | None = None,
    judge_url: str | None = None,
    judge_model: str | None = None,
    output_dir: str | None = None,
    limit: int | None = None,
    max_new_tokens: int | None = None,
    no_mlflow: bool = False,
) -> EvalConfig:
    """YAML (or the built-in default methods) + ``key=value`` overrides + explicit options, validated."""
    extra = list(overrides)
    for key, value in (("model", model), ("judge.url", judge_url), ("judge.model", judge_model),
                       ("output_dir", output_dir), ("max_new_tokens", max_new_tokens)):
        if value is not None:
            extra.append(f"{key}={value}")
    if no_mlflow:
        extra.append("mlflow.enabled=false")
    if config is not None:
        cfg = load_config(EvalConfig, config, extra)
    else:
        data = {"methods": [m.model_dump(mode="json", exclude_unset=True) for m in default_methods()]}
        cfg = validate_config(EvalConfig, apply_overrides(data, extra), "<default eval config>")
    if limit is not None:
        for ps in cfg.prompt_sets:
            ps.limit = limit
    return cfg


def headline_table(report, prompt_set: str | None = None, title: str | None = None) -> Table:
    """Cost improvement, similarity, tokens and judge per method (the numbers `make demo` shows)."""
    name = prompt_set or next(iter(report.data["prompt_sets"]))
    n = report.data["prompt_sets"][name]["num_prompts"]
    table = Table(title=title or f"Early exit vs final layer on {name} ({n} prompts)")
    for col in ("method", "cost impr. %", "spaCy sim", "MiniLM cos", "token agr.", "tokens (final)", "judge"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for row in report.headline_rows(name):
        def f(v, fmt):
            return "-" if v is None else format(v, fmt)

        table.add_row(row["method"], f(row["cost_improvement_pct"], ".1f"), f(row["similarity_spacy"], ".3f"),
                      f(row["similarity_embedding"], ".3f"), f(row["token_agreement"], ".3f"),
                      f"{row['tokens_mean']:.1f} ({row['reference_tokens_mean']:.1f})", row["judge"])
    return table


def eval_command(
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    console: Console | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Run an evaluation and print its headline tables; returns paths, MLflow run id and headline rows.

    ``options`` are :func:`build_eval_config`'s keyword options (model, judge_url, limit, no_mlflow...).
    """
    from layerexit.evaluation.report import run_evaluation

    console = console or Console()
    cfg = build_eval_config(config, overrides, **options)
    report = run_evaluation(cfg, console=console)
    for name in report.data["prompt_sets"]:
        console.print(headline_table(report, name))
    console.print(f"report: {report.markdown_path}")
    console.print(f"numbers: {report.json_path}")
    if report.mlflow_run_id:
        console.print(f"MLflow run: {report.mlflow_run_id} (experiment {cfg.mlflow.experiment})")
    return {
        "report": str(report.markdown_path),
        "json": str(report.json_path),
        "figures": {k: str(v) for k, v in report.figures.items()},
        "mlflow_run_id": report.mlflow_run_id,
        "headline": {name: report.headline_rows(name) for name in report.data["prompt_sets"]},
    }
