"""What the draft search leaves behind: its outcome (``DraftOutcome``), summary.json, trials.csv, report.md, the speedup plot, the MLflow parent
run's metrics and artifacts, and the registered model version's tags."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

from layerexit.tuning.draft_config import DraftTuneConfig
from layerexit.tuning.draft_choice import DraftChoice
from layerexit.tuning.draft_trials import TRIAL_METRICS


@dataclass
class DraftOutcome:
    """What a draft search produced."""

    chosen: dict | None
    trials: list[dict] = field(default_factory=list)
    failed_trials: list[dict] = field(default_factory=list)
    layers: list[DraftChoice] = field(default_factory=list)
    heldout: dict | None = None  # our engine, the chosen (layer, k), held-out prompts
    vllm: dict | None = None
    draft: dict | None = None
    serve_config: str | None = None
    serve_config_rewritten: bool = False
    files: dict[str, str] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    machine: dict = field(default_factory=dict)
    exit_code: int = 0
    model_version: tuple[str, str] | None = None  # (name, version) when the model came from the MLflow registry

    def summary(self) -> dict[str, Any]:
        return {
            "exit_code": self.exit_code, "chosen": self.chosen,
            "heldout_engine": self.heldout, "vllm": self.vllm,
            "layers": [{"layer": r.layer, "cost_ratio": r.cost_ratio, "best_k": r.num_draft,
                        "best_predicted_speedup": r.predicted_speedup, "per_position": r.stats.per_position,
                        "measured_at_k": r.stats.num_draft} for r in self.layers],
            "trials": self.trials, "failed_trials": self.failed_trials, "draft": self.draft,
            "serve_config": self.serve_config, "serve_config_rewritten": self.serve_config_rewritten,
            "files": self.files, "mlflow_run_id": self.mlflow_run_id,
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()}, "notes": self.notes,
            "machine": self.machine,
        }


def _write_files(o: DraftOutcome, cfg: DraftTuneConfig, out_dir: Path, model: str, storage: str) -> dict[str, str]:
    from layerexit.training.draft_stage import plot_acceptance

    files = {"ray_results": storage}
    cols = ["layer", "num_speculative_tokens", *TRIAL_METRICS, "steps", "drafted", "accepted", "per_position"]
    with (out_dir / "trials.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for t in o.trials:
            w.writerow({**t, "per_position": " ".join(f"{a:.4f}" for a in t["per_position"])})
    files["trials"] = str(out_dir / "trials.csv")
    files["acceptance_png"] = str(plot_acceptance(o.layers, out_dir / "draft_acceptance.png"))
    files["speedup_png"] = str(plot_speedup(o.trials, o.chosen, out_dir / "draft_speedup.png",
                                            f"{model}: predicted speedup by draft layer and k ({len(o.trials)} "
                                            f"trials, {cfg.trials.measure})"))
    (out_dir / "report.md").write_text(render_report(cfg, o, model))
    files["report"] = str(out_dir / "report.md")
    if o.vllm and (out_dir / "vllm_check.json").is_file():
        files["vllm_check"] = str(out_dir / "vllm_check.json")
    files["summary"] = str(out_dir / "summary.json")
    return files


def plot_speedup(trials: Sequence[dict], chosen: dict | None, path: Path, title: str) -> Path:
    """Predicted speedup against k, one line per draft layer; the chosen point circled, break-even dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for layer in sorted({t["layer"] for t in trials}):
        mine = sorted((t for t in trials if t["layer"] == layer), key=lambda t: t["num_speculative_tokens"])
        ax.plot([t["num_speculative_tokens"] for t in mine], [t["predicted_speedup"] for t in mine], marker="o",
                label=f"layer {layer} (cost {mine[0]['cost_ratio']:.2f})")
    if chosen is not None:
        ax.scatter([chosen["num_speculative_tokens"]], [chosen["predicted_speedup"]], s=220, facecolors="none",
                   edgecolors="black", linewidths=2, zorder=5, label="chosen")
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("num_speculative_tokens k")
    ax.set_ylabel("predicted speedup E / (k c + 1)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fmt(values: Sequence[float] | None) -> str:
    return " ".join(f"{v:.2f}" for v in values or []) or "-"


def render_report(cfg: DraftTuneConfig, o: DraftOutcome, model: str) -> str:
    c = o.chosen or {}
    val, rep = cfg.prompts.validation, cfg.prompts.report
    lines = [f"# Draft search: {model}", "",
             f"- search prompts: {val.limit} ({val.file or val.split}), held-out: {rep.limit} "
             f"({rep.file or rep.split}), "
             f"{cfg.prompts.max_new_tokens} tokens each; measure: {cfg.trials.measure}",
             f"- trials: {len(o.trials)} ok, {len(o.failed_trials)} failed (layers {cfg.space.layers}, k "
             f"{cfg.space.ks[0]}..{cfg.space.ks[-1]})",
             f"- chosen: layer {c.get('layer')}, k {c.get('num_speculative_tokens')}: predicted speedup "
             f"{c.get('predicted_speedup', 0):.3f}x at cost {c.get('cost_ratio', 0):.3f} of a step",
             f"- Serve config: {o.serve_config or '-'} ({'rewritten' if o.serve_config_rewritten else 'unchanged'})",
             f"- machine: {o.machine.get('cpu')}, {o.machine.get('threads')} threads", ""]
    lines += [f"- note: {n}" for n in o.notes]
    lines += ["", "## Per layer (search prompts)", "",
              "| layer | cost ratio | acceptance by position (conditional) | best k | predicted speedup |",
              "|---|---|---|---|---|"]
    lines += [f"| {r.layer} | {r.cost_ratio:.3f} | {_fmt(r.stats.per_position)} | {r.num_draft} | "
              f"{r.predicted_speedup:.3f} |" for r in o.layers]
    lines += ["", "## The chosen draft on held-out prompts", "",
              "| engine | acceptance | by position (conditional) | tokens / verification | tokens/s |",
              "|---|---|---|---|---|"]
    if o.heldout:
        h = o.heldout
        lines.append(f"| layerexit (self-speculative) | {h['acceptance']:.3f} | {_fmt(h['per_position'])} | "
                     f"{h['tokens_per_verification']:.3f} | - |")
    if o.vllm and "with_draft" in o.vllm:
        sd = o.vllm["with_draft"].get("spec_decode", {})
        drafts = sd.get("drafts") or 0
        tpv = 1 + sd.get("accepted_tokens", 0) / drafts if drafts else 0.0
        lines.append(f"| vLLM {o.vllm.get('dtype')} (draft model) | {sd.get('acceptance', 0):.3f} | "
                     f"{_fmt(sd.get('acceptance_per_position_conditional'))} | {tpv:.3f} | "
                     f"{o.vllm['with_draft'].get('tokens_per_s')} |")
        if "identical" in o.vllm:
            lines.append(f"\nvLLM greedy completions identical with and without the draft: "
                         f"{o.vllm['identical']}/{o.vllm['prompts']}")
    elif o.vllm:
        lines.append(f"\nvLLM: {o.vllm.get('error')}")
    return "\n".join(lines) + "\n"


def _log_outcome(run, o: DraftOutcome, cfg: DraftTuneConfig) -> None:
    from layerexit.evaluation.mlflow_report import log_overview_png

    c = o.chosen or {}
    metrics = {"trials_ok": len(o.trials), "trials_failed": len(o.failed_trials),
               "chosen_layer": c.get("layer"), "chosen_k": c.get("num_speculative_tokens"),
               "chosen_predicted_speedup": c.get("predicted_speedup"), "chosen_acceptance": c.get("acceptance"),
               "chosen_cost_ratio": c.get("cost_ratio"), "serve_config_rewritten": float(o.serve_config_rewritten)}
    for r in o.layers:
        metrics[f"best_predicted_speedup/layer_{r.layer:02d}"] = r.predicted_speedup
        metrics[f"first_position_acceptance/layer_{r.layer:02d}"] = r.stats.per_position[0]
    if o.heldout:
        metrics.update({"heldout_acceptance": o.heldout["acceptance"],
                        "heldout_predicted_speedup": o.heldout["predicted_speedup"]})
        metrics.update({f"heldout_accept_pos_{i}": a for i, a in enumerate(o.heldout["per_position"], start=1)})
    if o.vllm and "with_draft" in o.vllm:
        sd = o.vllm["with_draft"].get("spec_decode", {})
        metrics.update({"vllm_acceptance": sd.get("acceptance"), "vllm_tokens_per_s": o.vllm["with_draft"]
                        .get("tokens_per_s"), "vllm_start_s": o.vllm["with_draft"].get("start_s")})
        metrics.update({f"vllm_accept_pos_{i}": a for i, a in
                        enumerate(sd.get("acceptance_per_position_conditional", []), start=1)})
        if "identical" in o.vllm:
            metrics["vllm_identical_without_draft"] = o.vllm["identical"]
    metrics.update({f"seconds_{k}": v for k, v in o.seconds.items()})
    run.log_metrics({k: v for k, v in metrics.items() if v is not None})
    run.set_tags({"chosen_draft": json.dumps({"layer": c.get("layer"), "num_speculative_tokens":
                                              c.get("num_speculative_tokens")}),
                  "exit_code": str(o.exit_code)})
    log_overview_png(run, o.files.get("speedup_png", ""), "draft_speedup")
    for key in ("speedup_png", "acceptance_png", "trials", "report", "vllm_check"):
        if key in o.files:
            run.log_artifact(o.files[key], "tune-draft")
    summary = Path(o.files["summary"])
    summary.write_text(json.dumps(o.summary(), indent=2))
    run.log_artifact(summary, "tune-draft")
    if o.serve_config_rewritten and o.serve_config:
        run.log_artifact(o.serve_config, "serve_config")
    if o.draft:
        meta = Path(o.draft["directory"]) / "layerexit_draft.json"
        if meta.is_file():
            run.log_artifact(meta, "draft")
    if cfg.mlflow.attach_to_model_version and o.model_version and c:
        _tag_model_version(cfg, o.model_version, c, run.run_id)
        o.notes.append(f"tagged registered model {o.model_version[0]} version {o.model_version[1]} with the draft")


def _tag_model_version(cfg: DraftTuneConfig, model_version: tuple[str, str], chosen: dict, run_id: str) -> None:
    from mlflow import MlflowClient

    from layerexit.tracking import _retry, resolve_tracking_uri

    name, version = model_version
    client = MlflowClient(tracking_uri=resolve_tracking_uri(cfg.mlflow.tracking_uri))
    for key, value in {"layerexit.draft.layer": chosen["layer"],
                       "layerexit.draft.num_speculative_tokens": chosen["num_speculative_tokens"],
                       "layerexit.draft.predicted_speedup": f"{chosen['predicted_speedup']:.4f}",
                       "layerexit.draft.run_id": run_id}.items():
        _retry(client.set_model_version_tag, name, str(version), key, str(value))
