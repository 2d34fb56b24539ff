"""The evaluation stage of ``make demo``: a short evaluation and its headline table (cost, similarity, tokens)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from layerexit.engine.options import ExitConfig
from layerexit.evaluation.config import EvalConfig, EvalMethod, PromptSetConfig


def run_demo_eval(
    console: Console,
    model_spec: str,
    exit_configs: dict[str, ExitConfig],
    out_dir: str | Path,
    *,
    limit: int = 8,
    max_new_tokens: int = 32,
    prompts_path: str | Path | None = None,
    model_and_tokenizer=None,
    alignment: bool = False,
    mlflow: bool = False,
    experiment: str = "layerexit-demo",
    run_name: str = "demo-eval",
    show_progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``exit_configs`` ({name: ExitConfig}) against the final layer on ``limit`` held-out prompts (or
    ``prompts_path``), print the headline table, and return its rows plus where the report was written.

    Pass ``model_and_tokenizer`` to reuse an already loaded model (e.g. the demo's freshly trained one). With
    ``mlflow``, the evaluation is logged like ``jobs/evaluate.py`` logs it (one parent run, one nested run per
    configuration) into ``experiment`` of the default store, beside the demo's training run.
    """
    from layerexit.evaluation.cli_eval import headline_table
    from layerexit.evaluation.report import run_evaluation

    methods = [EvalMethod(name=name, **ec.model_dump(exclude_unset=True)) for name, ec in exit_configs.items()]
    prompt_set = PromptSetConfig(name="demo", path=str(prompts_path), limit=limit) if prompts_path \
        else PromptSetConfig(name="heldout", limit=limit)
    cfg = EvalConfig(
        model=model_spec,
        prompt_sets=[prompt_set],
        methods=methods,
        max_new_tokens=max_new_tokens,
        output_dir=str(out_dir),
        alignment={"enabled": alignment},
        mlflow={"enabled": mlflow, "experiment": experiment, "run_name": run_name},
        show_progress=show_progress,
    )
    report = run_evaluation(cfg, model_and_tokenizer=model_and_tokenizer, console=console)
    console.print(headline_table(report, title=f"Early exit vs final layer: {model_spec}, "
                                 f"{report.data['prompt_sets'][prompt_set.name]['num_prompts']} prompts, "
                                 f"{max_new_tokens} tokens"))
    console.print(f"report: {report.markdown_path}")
    if report.mlflow_run_id:
        console.print(f"MLflow: evaluation run {report.mlflow_run_id} (experiment {experiment}, one nested run per "
                      "configuration)")
    return {
        "headline": report.headline_rows(),
        "report": str(report.markdown_path),
        "json": str(report.json_path),
        "mlflow_run_id": report.mlflow_run_id,
    }
