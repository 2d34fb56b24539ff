"""Draft search with Ray Tune: which exit layer drafts and how many tokens it proposes, chosen on measured
acceptance and the weight-bytes cost model (``tuning.draft_choice``), confirmed by a real vLLM run, exported as a
Serve config.

This module is the job; its parts live beside it: trace replay (``draft_replay``), the Ray Tune trials
(``draft_trials``), Serve-config rewriting (``draft_serve``), the vLLM subprocess (``draft_vllm``) and the files,
plots, Markdown report and MLflow/registry tags it leaves behind (``draft_report``).

``run_draft_tuning(cfg)`` is the whole job (``jobs/tune_draft.py`` calls it):

0. Before any trial: the Serve config to rewrite exists and is a layerexit one, vLLM is importable in
   ``confirm.python`` (unless ``confirm.vllm: false``), every candidate layer is below the model's depth.
1. The model (loaded once, in the driver) decodes the search prompts (training split) with the final layer, and
   records along those answers each candidate layer's top-1 token (``record_traces``, one teacher-forced pass).
2. Ray Tune runs one trial per (layer, k) grid point. With ``trials.measure: traces`` a trial replays lossless
   self-speculative decoding on those traces (``simulate_acceptance``): a layer-l draft of the final layer's
   greedy prefix computes exactly what the trace holds, so a draft token is accepted where the trace's layer-l
   top-1 equals the answer token, and blocks of k drafts are cut where the engine cuts them. The counts are
   ``measure_acceptance``'s, in milliseconds instead of a decode per point. With ``measure: engine`` a trial
   process loads the model and decodes its layer with the engine once, at the longest k, and scores shorter k from
   the per-position rates (``draft_choice.choose_draft``'s rule). Each trial reports per-position acceptance,
   acceptance, the draft's cost ratio and the predicted speedup; MLflow gets a nested run per trial.
3. The best predicted speedup wins (ties: the cheaper draft).
4. Our engine decodes the choice on held-out prompts (``measure_acceptance``, real decoding at the chosen k).
5. The chosen draft is exported (``export_draft``) and run by vLLM on the same held-out prompts
   (``layerexit.serving.vllm_check`` in ``.venv-vllm``): vLLM's own speculative-decoding counters stand beside ours.
6. Export: summary.json, report.md, trials.csv, plots; a vLLM Serve config gets ``draft`` and
   ``num_speculative_tokens`` (an engine Serve config a self-speculative ``user_config``), comments kept, when the
   predicted speedup reaches ``export.min_speedup``. All of it is logged to the MLflow parent run.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from layerexit.errors import ConfigError, LayerexitError
from layerexit.tuning.draft_choice import draft_cost_ratio, measure_acceptance, predicted_speedup
from layerexit.tuning.draft_config import DraftTuneConfig

# The job's parts, one module each, re-exported: ``layerexit.tuning.draft_search`` stays the one import for callers.
from layerexit.tuning.draft_replay import TraceReplay, _Event, score_point, simulate_acceptance, trace_matches
from layerexit.tuning.draft_report import (DraftOutcome, _fmt, _log_outcome, _tag_model_version, _write_files,
                                           plot_speedup, render_report)
from layerexit.tuning.draft_serve import VLLM_BACKEND_IMPORT, rewrite_serve_draft, serve_config_kind
from layerexit.tuning.draft_trials import (TRIAL_METRICS, DraftSearchResult, TrialInputs, _engine_stats, _trial,
                                           best_point, evaluate_point, layer_rows, run_draft_search)
from layerexit.tuning.draft_vllm import (VLLM_CHECK_MODULE, VLLM_ENV_FIX, VLLM_FAILED, VLLM_PYTHON_ENV,
                                         confirm_with_vllm, find_vllm_python, require_vllm_env, run_vllm_check,
                                         vllm_python)

__all__ = [  # the job, and its parts' public names (re-exported)
    "BELOW_MIN_SPEEDUP", "DraftOutcome", "DraftSearchResult", "TRIAL_METRICS", "TraceReplay", "TrialInputs",
    "VLLM_BACKEND_IMPORT", "VLLM_CHECK_MODULE", "VLLM_ENV_FIX", "VLLM_FAILED", "VLLM_PYTHON_ENV", "best_point",
    "draft_command", "draft_target", "evaluate_point", "find_vllm_python", "layer_rows", "model_depth_of",
    "plot_speedup", "preflight", "render_report", "require_vllm_env", "rewrite_serve_draft", "run_draft_search",
    "run_draft_tuning", "run_vllm_check", "score_point", "serve_config_kind", "simulate_acceptance",
    "trace_matches", "vllm_python",
]

BELOW_MIN_SPEEDUP = 3


# ------------------------------------------------------------------------------------------ the whole job
def draft_target(cfg: DraftTuneConfig, layer: int) -> tuple[Path, str]:
    """Where the layer's draft is exported, and the path the Serve config gets (``~`` kept, else absolute)."""
    ref = (cfg.export.draft_dir or str(Path(cfg.output_dir) / "draft-l{layer}")).format(layer=layer)
    directory = Path(ref).expanduser()
    return directory, ref if ref.startswith("~") else str(directory.resolve())


def preflight(cfg: DraftTuneConfig, serve_config: str | Path | None, notes: list[str] | None = None) -> str | None:
    """Checks that need neither Ray nor the model's weights; returns the Serve config's kind.

    ``notes`` given (``--check``): what cannot be known on this machine is appended there instead of failing (see
    ``require_vllm_env``)."""
    from layerexit.models.draft_export import DRAFT_META

    kind = serve_config_kind(serve_config, cfg.export.application) if serve_config is not None else None
    for layer in cfg.space.layers:  # export_draft refuses to replace anything but an earlier draft
        directory, _ = draft_target(cfg, layer)
        if directory.is_dir() and any(directory.iterdir()) and not (directory / DRAFT_META).is_file():
            raise ConfigError(f"export.draft_dir: {directory} exists and is not a draft directory",
                              "point export.draft_dir at a new directory (or an earlier draft's)")
    if cfg.confirm.vllm:
        note = require_vllm_env(cfg, missing_auto_ok=notes is not None)
        if note is not None and notes is not None:
            notes.append(note)
    return kind


def model_depth_of(spec: str, num_layers: int | None = None) -> int | None:
    """The model's depth from its config.json without loading weights (checked against ``num_layers`` when both are
    known), else ``num_layers``, else None. An MLflow model URI is never downloaded here (that would fetch the
    weights): its depth is ``num_layers``."""
    from types import SimpleNamespace

    from layerexit.models.mlflow_source import is_mlflow_uri
    from layerexit.training.config import model_depth

    if is_mlflow_uri(spec):
        return num_layers
    try:
        return model_depth(SimpleNamespace(model=SimpleNamespace(spec=spec, num_layers=num_layers)))
    except ConfigError as err:
        if "cannot read the depth" in err.problem:
            return None
        raise


def draft_command(config: str | Path, overrides: Sequence[str] = (), serve_config: str | Path | None = None) -> int:
    """What ``jobs/tune_draft.py`` does: load the YAML (+ key=value overrides), run, and return the exit status:
    0 done, 2 bad input (one line on stderr), 3 the best draft's predicted speedup is below export.min_speedup,
    4 the vLLM confirmation failed (Serve config left unchanged in both)."""
    from layerexit.config import load_config

    try:
        cfg = load_config(DraftTuneConfig, config, list(overrides))
        outcome = run_draft_tuning(cfg, serve_config=serve_config)
    except LayerexitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for note in outcome.notes:
        if outcome.exit_code:
            print(f"note: {note}", file=sys.stderr)
    return outcome.exit_code


def run_draft_tuning(cfg: DraftTuneConfig, serve_config: str | Path | None = None, console=None) -> DraftOutcome:
    """Search, confirm and export the draft as ``cfg`` says (see the module docstring). Raises ConfigError for
    bad input, before any trial starts."""
    from rich.console import Console

    from layerexit.tuning.search import prompt_texts

    console = console or Console(soft_wrap=True)
    serve_config = serve_config if serve_config is not None else cfg.export.serve_config
    kind = preflight(cfg, serve_config)
    val_texts = prompt_texts(cfg.prompts.validation)
    report_texts = prompt_texts(cfg.prompts.report) if cfg.prompts.report.limit else []
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    from layerexit.tuning.mlflow_tune import search_session

    with search_session(cfg, "tune-draft", "tune-draft") as run:
        outcome = _run(cfg, kind, serve_config, val_texts, report_texts, out_dir, console, run)
        if run is not None:
            outcome.mlflow_run_id = run.run_id
            _log_outcome(run, outcome, cfg)
        (out_dir / "summary.json").write_text(json.dumps(outcome.summary(), indent=2))
        return outcome


def _run(cfg: DraftTuneConfig, kind, serve_config, val_texts, report_texts, out_dir: Path, console, run):
    from layerexit.engine.decode import EarlyExitEngine
    from layerexit.machine import describe_machine
    from layerexit.tuning.confirm import ModelWorker

    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    notes: list[str] = []
    space = cfg.space
    worker = ModelWorker(cfg.model.spec, cfg.model.dtype, cfg.model.device, cfg.show_progress, cfg.model.name)
    info = worker.info()
    if cfg.model.num_layers is not None and cfg.model.num_layers != info.num_layers:
        raise ConfigError(f"num_layers={cfg.model.num_layers} but {cfg.model.spec} has {info.num_layers} layers",
                          "fix num_layers or remove it")
    space.check(info.num_layers)
    seconds["load_model"] = time.perf_counter() - t0
    max_new = cfg.prompts.max_new_tokens
    console.print(f"[bold]draft search[/] {cfg.model.spec}: {info.num_layers} layers, candidate layers "
                  f"{space.layers}, k {space.ks[0]}..{space.ks[-1]} ({space.size} trials), {len(val_texts)} search "
                  f"prompts x {max_new} tokens, measure: {cfg.trials.measure}")

    val_ids = worker.encode(val_texts)
    cost = {l: draft_cost_ratio(worker.model, l) for l in space.layers}
    inputs = TrialInputs(cfg.trials.measure, max_new, space.ks[-1], cost)
    if cfg.trials.measure == "traces":
        t = time.perf_counter()
        answers = worker.generate(val_ids, {"policy": "final"}, max_new, cfg.prompts.batch_size)["token_ids"]
        seconds["final_answers"] = time.perf_counter() - t
        t = time.perf_counter()
        traces = worker.traces(val_ids, answers, space.layers)
        seconds["traces"] = time.perf_counter() - t
        inputs.matches = trace_matches(traces, answers, space.layers)
        inputs.ended_by_eos = [bool(a) and a[-1] in worker.eos for a in answers]
        console.print(f"final layer's answers ({seconds['final_answers']:.1f} s), traces over {len(space.layers)} "
                      f"layers ({seconds['traces']:.1f} s)")
    else:
        # "auto" is resolved in each trial process: a trial may hold a GPU the driver lacks
        inputs.prompts, inputs.spec, inputs.dtype, inputs.device = val_ids, cfg.model.spec, cfg.model.dtype, \
            cfg.model.device
        inputs.batch_size = cfg.prompts.batch_size
        inputs.threads = cfg.trials.threads or max(1, int(cfg.trials.trial_cpus))

    callbacks = []
    if run is not None and cfg.mlflow.nested_trial_runs:
        from layerexit.tuning.mlflow_tune import NestedTrialRuns

        def describe(config: dict) -> dict:
            return {"layer": config["layer"], "num_speculative_tokens": config["num_speculative_tokens"],
                    "measure": cfg.trials.measure}

        callbacks.append(NestedTrialRuns(run.run_id, cfg.mlflow.tracking_uri, describe,
                                         (*TRIAL_METRICS, *(f"accept_pos_{i}" for i in space.ks))))
    result = run_draft_search(inputs, space.layers, space.ks, cfg, out_dir / "ray_results", callbacks)
    seconds["search"] = result.seconds
    for f in result.failed:
        console.print(f"[yellow]trial {f['trial_id']} (layer {f['layer']}, k {f['num_speculative_tokens']}) "
                      f"failed[/] ({f['error']}); the search went on")
    if not result.trials:
        raise ConfigError(f"all {len(result.failed)} trials failed", "see the trial errors above and in ray_results")
    rows = layer_rows(result.trials)
    chosen = dict(best_point(result.trials))
    for r in rows:
        console.print(f"  layer {r.layer:>2}: cost {r.cost_ratio:.3f} of a step, acceptance by position "
                      + " ".join(f"{a:.2f}" for a in r.stats.per_position)
                      + f"; best k {r.num_draft}: predicted {r.predicted_speedup:.3f}x")
    console.print(f"search: {len(result.trials)} trials ok, {len(result.failed)} failed, {result.seconds:.1f} s; "
                  f"chosen layer {chosen['layer']}, k {chosen['num_speculative_tokens']}: predicted "
                  f"{chosen['predicted_speedup']:.3f}x, acceptance {chosen['acceptance']:.3f}")
    L, k = int(chosen["layer"]), int(chosen["num_speculative_tokens"])

    # held-out prompts, our engine, real decoding at the chosen (layer, k)
    heldout, engine = None, None
    if report_texts:
        t = time.perf_counter()
        rep_ids = worker.encode(report_texts)
        engine = EarlyExitEngine(worker.model, worker.eos, worker.pad)
        stats = measure_acceptance(engine, rep_ids, L, k, max_new, batch_size=cfg.prompts.batch_size)
        seconds["heldout_engine"] = time.perf_counter() - t
        heldout = {**stats.to_dict(), "prompts": len(rep_ids), "cost_ratio": cost[L],
                   "predicted_speedup": predicted_speedup(stats.per_position, cost[L], k),
                   "seconds": round(seconds["heldout_engine"], 1)}
        console.print(f"held-out ({len(rep_ids)} prompts, engine): acceptance {stats.acceptance:.3f}, by position "
                      + " ".join(f"{a:.2f}" for a in stats.per_position)
                      + f", predicted {heldout['predicted_speedup']:.3f}x ({seconds['heldout_engine']:.0f} s)")

    # export the chosen draft
    from layerexit.models.draft_export import export_draft

    t = time.perf_counter()
    draft_dir, draft_ref = draft_target(cfg, L)
    first = heldout["per_position"][0] if heldout and heldout["per_position"] else chosen["per_position"][0]
    dinfo = export_draft(worker.model, worker.tokenizer, L, draft_dir, agreement=first, base_spec=cfg.model.spec)
    seconds["export_draft"] = time.perf_counter() - t
    draft = {**dinfo.to_dict(), "directory": str(draft_dir.resolve()), "serve_path": draft_ref}
    console.print(f"exported the layer-{L} draft to {draft_dir} ({seconds['export_draft']:.1f} s)")
    machine = describe_machine()
    del worker, engine  # the model's memory goes back before vLLM starts
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # vLLM (another process) sizes its KV cache from the GPU memory left free

    # vLLM confirmation on the same held-out prompts
    vllm = None
    exit_code = 0
    if cfg.confirm.vllm:
        from layerexit.models.loading import resolve_model

        texts = report_texts if cfg.confirm.prompts == "report" else val_texts
        t = time.perf_counter()
        vllm = confirm_with_vllm(cfg, texts, info.local_dir or resolve_model(cfg.model.spec).location, draft_dir, k,
                                 out_dir, console)
        seconds["vllm"] = time.perf_counter() - t
        if "error" in vllm:
            notes.append(f"vLLM confirmation failed: {vllm['error']} (log: {out_dir / 'vllm_check.log'})")
            exit_code = VLLM_FAILED
    else:
        notes.append("vLLM confirmation skipped (confirm.vllm: false)")

    # export to the Serve config
    rewritten = False
    if chosen["predicted_speedup"] < cfg.export.min_speedup:
        notes.append(f"the best draft's predicted speedup {chosen['predicted_speedup']:.3f} is below "
                     f"export.min_speedup {cfg.export.min_speedup:g}: drafting would slow decoding down"
                     + (f"; {serve_config} left unchanged" if serve_config else ""))
        exit_code = exit_code or BELOW_MIN_SPEEDUP
    elif serve_config is not None and exit_code == 0:
        source = f"layerexit tune-draft run {run.run_id}" if run is not None else f"layerexit tune-draft {out_dir}"
        comment = (f"tuned: {source}; layer {L}, k {k}, predicted {chosen['predicted_speedup']:.2f}x"
                   + (f", vLLM acceptance {vllm['with_draft']['spec_decode'].get('acceptance', 0):.2f}"
                      if vllm and "with_draft" in vllm else ""))
        rewrite_serve_draft(serve_config, draft_ref, L, k, cfg.export.application, comment)
        rewritten = True
        console.print(f"rewrote {serve_config} ({kind}): draft layer {L}, {k} speculative tokens")
    elif serve_config is not None:
        notes.append(f"{serve_config} left unchanged: the vLLM confirmation failed")

    seconds["total"] = time.perf_counter() - t0
    outcome = DraftOutcome(chosen, result.trials, result.failed, rows, heldout, vllm, draft,
                           str(serve_config) if serve_config else None, rewritten, {}, None, seconds, notes, machine,
                           exit_code, info.registered)
    outcome.files = _write_files(outcome, cfg, out_dir, info.name, result.storage)
    return outcome
