"""The Ray Tune side of the draft search: one trial per (layer, k) grid point, scored on trace replay
(``draft_replay``) or by decoding with the engine in the trial process; the best point and the per-layer rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerexit.tuning.draft_choice import AcceptanceStats, DraftChoice, measure_acceptance
from layerexit.tuning.draft_config import DraftTuneConfig
from layerexit.tuning.draft_replay import score_point, simulate_acceptance

TRIAL_METRICS = ("acceptance", "predicted_speedup", "cost_ratio", "expected_tokens", "tokens_per_verification",
                 "measured_at_k")


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
