"""MLflow logging of an evaluation: one parent run, one nested run per exit configuration, stable metric names.

Built on ``layerexit.tracking`` (``tracked_run``, ``RunLogger``). The two helpers it lacks, ``nested_run`` and
``flatten``, are generic and belong in tracking.py; they live here until moved.

Metric names (stable across runs, so two evaluations line up in the MLflow UI):
- parent run:  ``<prompt_set>/<method>/<metric>``
- nested run:  ``<prompt_set>/<metric>`` (one nested run per method, named after it)
- per-layer metrics end in ``layer_08`` (zero-padded, ``layer_key``) so the UI sorts them by layer, not as text
  (l1, l10, l11, ..., l2).

The run's first artifact is a one-glance figure (``log_overview_png``: ``0-overview/cost_quality.png``, the
cost/quality table as a chart); the full report directory follows under ``report/``.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from layerexit.tracking import RunLogger, _retry, tracked_run

# Summary fields logged as metrics (None values, e.g. an unavailable judge, are skipped).
METRIC_FIELDS = (
    "prompts", "tokens_mean", "reference_tokens_mean", "flops_per_response", "reference_flops_per_response",
    "cost_improvement_pct", "token_cost_improvement_pct", "flops_per_token", "tokens_per_s", "wall_s",
    "similarity_spacy", "similarity_embedding", "token_agreement", "prefix_agreement", "exact_match_rate",
    "mean_exit_layer", "judge_reference_score", "judge_candidate_score", "judge_parse_failures",
    "judge_request_failures", "judge_scored_pairs",
)


OVERVIEW_DIR = "0-overview"  # the MLflow UI lists folders first, alphabetically: this one comes first


def layer_key(layer: int | str, width: int = 2) -> str:
    """``layer_08``: a per-layer metric suffix that sorts by layer (pad wider for models with >= 100 layers)."""
    return f"layer_{int(layer):0{width}d}"


def log_overview_png(run: RunLogger, png: str | Path, name: str) -> str | None:
    """Log ``png`` as ``0-overview/<name>.png``, the first entry of the run's artifact tree in the MLflow UI (which
    lists folders before files, alphabetically). Returns its artifact path, None when ``png`` does not exist."""
    png = Path(png)
    if not png.is_file():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / f"{name}.png"
        shutil.copyfile(png, target)
        run.log_artifact(target, OVERVIEW_DIR)
    return f"{OVERVIEW_DIR}/{target.name}"


def flatten(data: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values (tracking serialises them as JSON)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name, sep))
        else:
            out[name] = value
    return out


@contextlib.contextmanager
def nested_run(parent: RunLogger, run_name: str, tags: Mapping[str, str] | None = None) -> Iterator[RunLogger]:
    """A child run of ``parent`` (shown nested in the UI); FINISHED on success, FAILED on an exception."""
    client = parent.client
    parent_run = _retry(client.get_run, parent.run_id)
    run = _retry(client.create_run, parent_run.info.experiment_id, run_name=run_name,
                 tags={"mlflow.parentRunId": parent.run_id, **dict(tags or {})})
    logger = RunLogger(run.info.run_id, parent.tracking_uri)
    status = "FAILED"
    try:
        yield logger
        status = "FINISHED"
    finally:
        _retry(client.set_terminated, run.info.run_id, status)


def _metrics(summary: Mapping[str, Any], prefix: str) -> dict[str, float]:
    out = {}
    for key in METRIC_FIELDS:
        value = summary.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    for layer, share in (summary.get("exit_share") or {}).items():
        out[f"{prefix}exit_share/{layer_key(layer)}"] = float(share)
    return out


def log_evaluation(report: Mapping[str, Any], out_dir: str | Path, experiment: str, run_name: str,
                   tracking_uri: str | None = None) -> str:
    """Log a finished report (the dict written as report.json) and its directory; returns the parent run id."""
    cfg = report["config"]
    with tracked_run(experiment, run_name=run_name, tracking_uri=tracking_uri,
                     tags={"layerexit.kind": "evaluation", "layerexit.model": str(cfg["model"])}) as parent:
        figures = report.get("figures") or {}
        if "cost_quality" in figures:  # the one-glance figure first: cost vs quality of every configuration
            log_overview_png(parent, Path(out_dir) / figures["cost_quality"], "cost_quality")
        parent.log_params({
            "model": cfg["model"], "num_layers": report["model"]["num_layers"], "kv": cfg["kv"],
            "max_new_tokens": cfg["max_new_tokens"], "batch_size": cfg["batch_size"], "seed": cfg["seed"],
            "prompt_sets": [p["name"] for p in cfg["prompt_sets"]], "methods": [m["name"] for m in cfg["methods"]],
            "judge.url": cfg["judge"]["url"], "judge.model": cfg["judge"]["model"],
        })
        metrics: dict[str, float] = {}
        for set_name, block in report["prompt_sets"].items():
            metrics[f"{set_name}/num_prompts"] = float(block["num_prompts"])
            for method, summary in block["methods"].items():
                metrics.update(_metrics(summary, f"{set_name}/{method}/"))
        for label, rows in (report.get("alignment") or {}).items():
            safe = "".join(c if c.isalnum() or c in "_-." else "_" for c in label)
            for row in rows["rows"]:
                metrics[f"alignment/{safe}/{layer_key(row['layer'])}"] = float(row["alignment"])
        parent.log_metrics(metrics)
        parent.set_tags({f"judge_status.{s}": b["judge_status"] for s, b in report["prompt_sets"].items()})
        for method_cfg in cfg["methods"]:
            name = method_cfg["name"]
            with nested_run(parent, name, tags={"layerexit.kind": "evaluation-method"}) as child:
                child.log_params({k: v for k, v in flatten(method_cfg).items() if v is not None})
                child_metrics: dict[str, float] = {}
                tags: dict[str, str] = {}
                for set_name, block in report["prompt_sets"].items():
                    summary = block["methods"].get(name)
                    if summary is None:
                        continue
                    child_metrics.update(_metrics(summary, f"{set_name}/"))
                    tags[f"judge_status.{set_name}"] = summary.get("judge_status") or "not run"
                child.log_metrics(child_metrics)
                child.set_tags(tags)
        parent.log_artifacts(out_dir, "report")
        return parent.run_id
