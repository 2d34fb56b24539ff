"""Threshold search with Ray Tune, from traces to deployable thresholds.

``run_tuning(cfg)`` is the whole job (``jobs/tune_thresholds.py`` and ``layerexit tune`` call it):

1. The model (loaded once, in the driver or a GPU actor) generates the final layer's greedy responses on the
   validation prompts and records traces along them: per token and per exit layer, top-1 token and confidence.
2. ``run_search``: Ray Tune trials score threshold sets on those traces (``TraceScorer``: expected FLOPs ratio and
   agreement with the final layer) in milliseconds. The scorer reaches every trial through the object store
   (``tune.with_parameters``); no trial touches the model. OptunaSearch optimises both objectives at once (metric
   and mode lists); grid and random search are there too. A crashing trial ends ERROR (MLflow: FAILED) and the
   search goes on.
3. The Pareto front of the trials is plotted with the paper's presets and the AdaInfer classifier as reference
   points (scored on the same traces).
4. Front points spread along it are confirmed by real generation on the validation prompts (FLOPs from the engine,
   quality from ``layerexit.evaluation.similarity``); the cheapest confirmed set reaching ``quality.min`` is chosen.
   If none reaches it, the best found is reported, the constraint is said not to be met and the job exits 3.
5. The chosen set and the references are reported on held-out prompts the search never saw (``prompts.report``).
6. Export: thresholds file, Serve ``user_config`` block, optional in-place rewrite of a Serve config; MLflow gets
   the parent run (params, figures, thresholds) with nested trial runs, and a registry model version gets tagged.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerexit.engine.thresholds import map_preset
from layerexit.engine.traces import ExitTraces
from layerexit.errors import ConfigError
from layerexit.tuning.config import SearchSettings, TuneSearchConfig
from layerexit.tuning.objective import TraceScorer
from layerexit.tuning.pareto import Point, pareto_front, plot_front, spread, write_points
from layerexit.tuning.space import ThresholdSpace

METRICS = ("flops_ratio", "quality")
MODES = ("min", "max")
CHECK_HEAD_KEY = "check_head"
EXIT_CONSTRAINT_NOT_MET = 3


# ----------------------------------------------------------------------------------------------- the trial
def _trial(config: dict, scorer: TraceScorer, space: ThresholdSpace, before_trial: Callable | None = None) -> None:
    """One Tune trial: map the point to thresholds, score them on the traces, report."""
    from ray import tune

    thresholds = space.thresholds(config)
    if before_trial is not None:
        before_trial(thresholds)
    if isinstance(scorer, Mapping):  # the check head is a dimension of the space: its own pricing and confidences
        scorer = scorer[config[CHECK_HEAD_KEY]]
    score = scorer.score(thresholds)
    metrics: dict[str, Any] = score.metrics()
    metrics["quality"] = score.agreement
    metrics["checked_layers"] = len(thresholds)
    metrics.update({f"thr_{l:02d}": v for l, v in thresholds.items()})
    tune.report(metrics)


@dataclass
class SearchResult:
    trials: list[Point]
    failed: list[dict]
    seconds: float
    storage: str


def run_search(scorer: TraceScorer | Mapping[str, TraceScorer], space: ThresholdSpace, settings: SearchSettings,
               storage_dir: str | Path, name: str = "tune-thresholds", callbacks: Sequence = (),
               before_trial: Callable | None = None, seed_points: Sequence[Mapping[int, float]] = ()) -> SearchResult:
    """Run the Ray Tune search over ``space`` (Ray must be initialised). Failed trials are collected, not raised.
    ``scorer`` as {check head spec: scorer} makes the check head a categorical dimension of the search (every seed
    point is evaluated with every head); each trial's point records its ``check_head``."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    params: dict[str, Any] = {"scorer": scorer, "space": space}
    if before_trial is not None:
        params["before_trial"] = before_trial
    trainable = tune.with_resources(tune.with_parameters(_trial, **params), {"cpu": settings.trial_cpus})
    param_space = space.tune_space(settings.algorithm, settings.grid_points)
    heads = list(scorer) if isinstance(scorer, Mapping) else None
    if heads:
        param_space[CHECK_HEAD_KEY] = tune.grid_search(heads) if settings.algorithm == "grid" else tune.choice(heads)
    num_samples = settings.num_trials
    if settings.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        points = [p for p in (space.params_for(t) for t in seed_points) if p is not None]
        if heads:
            points = [{**p, CHECK_HEAD_KEY: h} for p in points for h in heads]
        points = points[: settings.num_trials]
        search_alg = OptunaSearch(metric=list(METRICS), mode=list(MODES), points_to_evaluate=points or None,
                                  seed=settings.seed)
    elif settings.algorithm == "random":
        search_alg = BasicVariantGenerator(random_state=settings.seed)
    else:
        size = space.grid_size(settings.grid_points) * (len(heads) if heads else 1)
        if size > settings.num_trials:
            raise ConfigError(f"the grid has {size} points, over the trial budget of {settings.num_trials}",
                              "lower search.grid_points, tune fewer layers, or raise search.num_trials")
        search_alg, num_samples = None, 1
    finished, errors, seconds, path = fit_trials(
        trainable, param_space, name=name, storage_dir=storage_dir, max_concurrent=settings.max_concurrent,
        verbose=settings.verbose, callbacks=callbacks, required_metric="flops_ratio", search_alg=search_alg,
        num_samples=num_samples)
    trials, failed = [], []
    for trial_id, r, error in errors:
        failed.append({"trial_id": trial_id, "thresholds": space.thresholds(r.config or {}), "error": error})
    for trial_id, r in finished:
        m = r.metrics
        trials.append(Point(f"trial-{trial_id}", float(m["flops_ratio"]), float(m["quality"]),
                            space.thresholds(r.config or {}), "trial",
                            {"scored_on": "traces", "mean_exit_layer": m.get("mean_exit_layer"),
                             "checks_per_token": m.get("checks_per_token"),
                             **({"check_head": (r.config or {}).get(CHECK_HEAD_KEY)} if heads else {})}))
    return SearchResult(trials, failed, seconds, path)


def fit_trials(trainable, param_space: Mapping, *, name: str, storage_dir: str | Path, max_concurrent: int,
               verbose: int, callbacks: Sequence, required_metric: str, search_alg=None, num_samples: int = 1):
    """Run a Ray Tune search (Ray must be initialised; a failing trial never stops the others) and split its
    results: ``(finished, failed, seconds, storage path)``, finished as ``(trial_id, result)`` with
    ``required_metric`` reported, failed as ``(trial_id, result, last line of the error)``, in Tune's order."""
    from ray import tune

    storage = Path(storage_dir).resolve()
    storage.mkdir(parents=True, exist_ok=True)
    tuner = tune.Tuner(
        trainable,
        param_space=dict(param_space),
        tune_config=tune.TuneConfig(search_alg=search_alg, num_samples=num_samples,
                                    max_concurrent_trials=max_concurrent, reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=verbose,
                                  failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                                  callbacks=list(callbacks)),
    )
    t0 = time.perf_counter()
    grid = tuner.fit()
    seconds = time.perf_counter() - t0
    finished, failed = [], []
    for r in grid:
        trial_id = (r.metrics or {}).get("trial_id") or (Path(r.path).name if r.path else "?")
        if r.error is not None or not r.metrics or required_metric not in r.metrics:
            failed.append((trial_id, r, str(r.error).strip().splitlines()[-1] if r.error else "no result"))
        else:
            finished.append((trial_id, r))
    return finished, failed, seconds, str(storage / name)


def bisect_front(front: Sequence[Point], confirm: Callable[[Point], Point], min_quality: float,
                 budget: int, free: Callable[[Point], bool] = lambda p: p.kind == "final") -> list[Point]:
    """Confirm front points (cheapest first, so quality rises along it) to find the cheapest one whose confirmed
    quality reaches ``min_quality``: the most accurate point first (if it fails, nothing cheaper is tried), then
    bisection between the cheapest end and the cheapest passing point so far, within ``budget`` confirmations
    (``free`` points, the final layer, do not count). Returns the confirmed points in the order they were run."""
    done: dict[int, Point] = {}

    def spent() -> int:
        return sum(1 for i in done if not free(front[i]))

    def passes(i: int) -> bool:
        if i not in done:
            done[i] = confirm(front[i])
        return done[i].quality >= min_quality

    hi = len(front) - 1
    if hi < 0 or budget < 1 or not passes(hi):
        return list(done.values())
    lo = 0  # the cheapest passing point lies in [lo, hi]; hi passes
    while lo < hi and spent() < budget:
        mid = (lo + hi) // 2
        if passes(mid):
            hi = mid
        else:
            lo = mid + 1
    return list(done.values())


# ----------------------------------------------------------------------------------------------- helpers
def prompt_texts(sl) -> list[str]:
    """Texts of a ``PromptSlice``: a slice of the built-in split or of a JSONL file."""
    if sl.file is not None:
        from layerexit.data.prompts import read_prompts

        texts = [p.prompt for p in read_prompts(sl.file)]
        source = sl.file
    else:
        from layerexit.data.instructions import heldout_instructions, train_instructions

        items = train_instructions() if sl.split == "train" else heldout_instructions()
        texts = [i.text for i in items]
        source = f"the built-in {sl.split} split"
    out = texts[sl.offset : sl.offset + sl.limit]
    if sl.limit and not out:
        raise ConfigError(f"no prompts left in {source} after offset {sl.offset} ({len(texts)} prompts)",
                          "lower the offset")
    return out


def select_layers(traces: ExitTraces, layers: Sequence[int]) -> ExitTraces:
    """Traces restricted to some exit layers (the final layer is kept)."""
    keep = [j for j, l in enumerate(traces.layers[:-1]) if l in set(layers)] + [len(traces.layers) - 1]
    return ExitTraces([traces.layers[j] for j in keep], traces.top1[:, keep], traces.conf[:, keep],
                      traces.gap[:, keep], traces.context, traces.sequence,
                      None if traces.hidden is None else traces.hidden[:, keep])


def _fmt_thr(thresholds: Mapping[int, float]) -> str:
    return "{" + ", ".join(f"{l}: {v:g}" for l, v in sorted(thresholds.items())) + "}" if thresholds else "{} (final)"


@dataclass
class TuneOutcome:
    """What a search produced. ``constraint_met`` False: no confirmed set reached ``quality.min``."""

    constraint_met: bool
    chosen: Point | None
    thresholds: dict[int, float]
    user_config: dict[str, Any]
    best_tuned: Point | None = None
    trials: list[Point] = field(default_factory=list)
    failed_trials: list[dict] = field(default_factory=list)
    front: list[Point] = field(default_factory=list)
    references: list[Point] = field(default_factory=list)
    confirmed: list[Point] = field(default_factory=list)
    report: list[Point] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 0 if self.constraint_met else EXIT_CONSTRAINT_NOT_MET

    def summary(self) -> dict[str, Any]:
        return {
            "constraint_met": self.constraint_met,
            "thresholds": {str(k): v for k, v in self.thresholds.items()},
            "user_config": {k: ({str(a): b for a, b in v.items()} if isinstance(v, dict) else v)
                            for k, v in self.user_config.items()},
            "chosen": self.chosen.to_dict() if self.chosen else None,
            "best_tuned": self.best_tuned.to_dict() if self.best_tuned else None,
            "trials": len(self.trials), "failed_trials": self.failed_trials,
            "front": [p.to_dict() for p in self.front],
            "references": [p.to_dict() for p in self.references],
            "confirmed": [p.to_dict() for p in self.confirmed],
            "report": [p.to_dict() for p in self.report],
            "files": self.files, "mlflow_run_id": self.mlflow_run_id,
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()}, "notes": self.notes,
        }


# ------------------------------------------------------------------------------------------ the whole job
def tune_command(config: str | Path, overrides: Sequence[str] = (), serve_config: str | Path | None = None) -> int:
    """What ``jobs/tune_thresholds.py`` and ``layerexit tune`` do: load the YAML (+ key=value overrides), run, and
    return the exit status: 0 done, 2 bad input (one line on stderr), 3 quality minimum not met."""
    import sys

    from layerexit.config import load_config
    from layerexit.errors import LayerexitError

    try:
        cfg = load_config(TuneSearchConfig, config, list(overrides))
        outcome = run_tuning(cfg, serve_config=serve_config)
    except LayerexitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not outcome.constraint_met:
        print(f"error: minimum {cfg.quality.metric} {cfg.quality.min:g} not met by any confirmed threshold set "
              f"(best found: {outcome.best_tuned.quality:.3f}); see {outcome.files.get('report')}", file=sys.stderr)
    return outcome.exit_code


def run_tuning(cfg: TuneSearchConfig, serve_config: str | Path | None = None, console=None,
               before_trial: Callable | None = None) -> TuneOutcome:
    """Search, confirm, report and export exit thresholds as ``cfg`` says (see the module docstring).

    Raises ConfigError for bad input (empty search space, layers outside the model, grid over budget...). A minimum
    quality nothing reaches is not an exception: ``outcome.constraint_met`` is False (exit code 3 in the job).
    ``before_trial(thresholds)`` runs inside every trial before scoring (tests inject crashes with it).
    """
    from rich.console import Console

    console = console or Console(soft_wrap=True)
    settings, exits_note = cfg.space.resolve_exit_layers(cfg.model.spec)
    if exits_note:  # from here on the config carries the model's own exits (report, MLflow params)
        console.print(exits_note)
        cfg = cfg.model_copy(update={"space": settings})
    space = ThresholdSpace.from_settings(cfg.space).check()
    if cfg.search.algorithm == "grid" and space.grid_size(cfg.search.grid_points) > cfg.search.num_trials:
        raise ConfigError(f"the grid has {space.grid_size(cfg.search.grid_points)} points, over the trial budget of "
                          f"{cfg.search.num_trials}", "lower search.grid_points, tune fewer layers, or raise "
                          "search.num_trials")
    if serve_config is not None and not Path(serve_config).is_file():
        raise ConfigError(f"Serve config not found: {serve_config}", "pass an existing serve_configs/*.yaml")
    val_texts = prompt_texts(cfg.prompts.validation)
    report_texts = prompt_texts(cfg.prompts.report) if cfg.prompts.report.limit else []
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    from layerexit.tuning.mlflow_tune import search_session

    with search_session(cfg, "tune", "tune") as run:
        from layerexit.tuning.confirm import WorkerHandle

        t0 = time.perf_counter()
        worker = WorkerHandle(cfg.model.spec, cfg.model.dtype, cfg.model.device, cfg.model.num_gpus,
                              cfg.show_progress, cfg.model.name)
        try:  # the worker is a Ray actor: closed before search_session stops Ray
            outcome = _run(cfg, space, worker, val_texts, report_texts, out_dir, serve_config, console, run,
                           before_trial, t0)
            if run is not None:
                _log_outcome(run, outcome, cfg, worker.info())
            return outcome
        finally:
            worker.close()


def _run(cfg, space, worker, val_texts, report_texts, out_dir, serve_config, console, run, before_trial, t0):
    from layerexit.engine.classifier import classifier_exit_decisions, probe_traces, train_exit_classifier, \
        train_exit_probe
    from layerexit.tuning.confirm import Reference, confirm_candidates
    from layerexit.tuning.export import rewrite_serve_config, user_config_block, user_config_yaml, write_thresholds_file

    seconds: dict[str, float] = {}
    notes: list[str] = []
    info = worker.info()
    L = info.num_layers
    space.check(L)
    seconds["load_model"] = time.perf_counter() - t0
    console.print(f"[bold]threshold search[/] {cfg.model.spec}: {L} layers, exits {list(space.layers)}, "
                  f"{len(val_texts)} validation prompts, {cfg.prompts.max_new_tokens} tokens")

    # 1. final layer's responses and traces on the validation prompts
    t = time.perf_counter()
    val_ids = worker.encode(val_texts)
    val_resp = worker.final_responses(val_ids, cfg.prompts.max_new_tokens, cfg.prompts.batch_size)
    seconds["final_responses"] = time.perf_counter() - t
    t = time.perf_counter()
    presets = {name: {l: v for l, v in map_preset(name, L).items() if l < L} for name in cfg.reference.presets}
    seeds = {name: {l: v for l, v in map_preset(name, L).items() if l < L} for name in cfg.search.seed_presets}
    traced = sorted(set(space.layers).union(*[set(p) for p in presets.values()]))
    # Check heads searched with the thresholds: traces record the confidences each one sees.
    heads = list(cfg.check_heads) if cfg.check_heads and cfg.policy == "confidence" else None
    check_file, head_ids = None, {}
    if heads:
        from layerexit.engine.traces import parse_check_spec

        sizes = {h: int(parse_check_spec(h)[1]) for h in heads if h.startswith("static:")}
        if sizes:
            check_file, ids = worker.check_vocab(cfg.check_vocab_file, max(sizes.values()), cfg.check_vocab_prompts,
                                                 str((out_dir / "check_vocab.json").resolve()))
            head_ids = {h: ids[:n] for h, n in sizes.items()}
        seconds["check_vocab"] = time.perf_counter() - t
    traced_heads = {h: head_ids.get(h) for h in heads if h != "full"} if heads else None
    traces = worker.traces(val_ids, val_resp, traced, keep_hidden=cfg.policy == "probe", check_heads=traced_heads)
    traces.save(out_dir / "traces.npz")
    seconds["traces"] = time.perf_counter() - t
    accounting = cfg.kv if cfg.search.flops == "exact" else "per-token"
    # Checks priced as the engine computes them (candidate-set K or full heads), rows as Serve batches them.
    scorer = TraceScorer(traces, info.flops, accounting, check_vocab=cfg.check_vocab,
                         batch_size=cfg.search.batch_size, adapter_flops=info.adapter_flops)  # confidence rules: presets, the classifier
    head_scorers = {h: TraceScorer(traces, info.flops, accounting, batch_size=cfg.search.batch_size,
                                   adapter_flops=info.adapter_flops, check_head=h) for h in heads} if heads else None
    oracle = scorer.oracle(space.layers)
    notes.append(f"oracle ceiling of exits {list(space.layers)} on the validation traces (each token at its first "
                 f"agreeing exit, decided for free): FLOPs ratio {oracle.flops_ratio:.3f}")
    probe = None
    search_scorer = scorer
    if cfg.policy == "probe":
        # The probe is fitted on the same validation traces the search scores; held-out prompts judge the result.
        probe, probe_table = train_exit_probe(select_layers(traces, space.layers),
                                              cfg.reference.classifier_min_precision)
        search_scorer = TraceScorer(probe_traces(probe, traces), info.flops, accounting, check="probe",
                                    batch_size=cfg.search.batch_size, adapter_flops=info.adapter_flops)
    elif head_scorers:
        search_scorer = head_scorers
    console.print(f"final layer's responses ({seconds['final_responses']:.1f} s); traces: {len(traces.sequence)} "
                  f"tokens x {len(traced)} exit layers ({seconds['traces']:.1f} s); one LM head = "
                  f"{info.flops.head_in_layers():.2f} layers")

    # references scored on the same traces
    references = [Point("final", 1.0, 1.0, {}, "final", {"scored_on": "traces"})]
    for name, table in presets.items():
        s = scorer.score(table)
        references.append(Point(name, s.flops_ratio, s.agreement, table, "preset", {"scored_on": "traces"}))
    classifier = None
    if cfg.reference.classifier:
        sub = select_layers(traces, space.layers)
        classifier = train_exit_classifier(sub, cfg.reference.classifier_min_precision)
        s = scorer.score_exits(*scorer.decision_exits(classifier_exit_decisions(classifier, sub), sub.layers[:-1]),
                               checked_layers=sub.layers[:-1])
        references.append(Point("adainfer-classifier", s.flops_ratio, s.agreement, {}, "classifier",
                                {"scored_on": "traces"}))

    # 2. the search
    callbacks = []
    if run is not None and cfg.mlflow.nested_trial_runs:
        from layerexit.tuning.mlflow_tune import NestedTrialRuns

        def describe(config: dict) -> dict:
            thr = space.thresholds(config)
            return {"thresholds": json.dumps({str(k): v for k, v in thr.items()}),
                    **{f"thr_{l:02d}": v for l, v in thr.items()},
                    **({CHECK_HEAD_KEY: config[CHECK_HEAD_KEY]} if CHECK_HEAD_KEY in config else {})}

        callbacks.append(NestedTrialRuns(run.run_id, cfg.mlflow.tracking_uri, describe,
                                         ("flops_ratio", "quality", "mean_exit_layer", "checks_per_token")))
    # Presets are softmax confidences, meaningless for a probe: it is seeded with its own per-layer thresholds at
    # the classifier's precision target instead.
    seed_points = [{l: probe_table[l] for l in space.layers}] if cfg.policy == "probe" else list(seeds.values())
    if cfg.search.anchor_points:
        seed_points.append({l: space.ranges[l][1] for l in space.layers})
    result = run_search(search_scorer, space, cfg.search, out_dir / "ray_results", "tune-thresholds", callbacks,
                        before_trial, seed_points)
    for p in result.trials:
        p.extra["policy"] = cfg.policy
    seconds["search"] = result.seconds
    for f in result.failed:
        console.print(f"[yellow]trial {f['trial_id']} failed[/] ({f['error']}); the search went on")
    if not result.trials:
        raise ConfigError(f"all {len(result.failed)} trials failed", "see the trial errors above and in ray_results")
    # The final layer (no exit: ratio 1, quality 1 by definition) is part of every front: the search must beat it.
    front = pareto_front([*result.trials, references[0]])
    console.print(f"search: {len(result.trials)} trials ok, {len(result.failed)} failed, {result.seconds:.1f} s; "
                  f"Pareto front: {len(front)} points")

    # 3./4. confirmation by real generation on the validation prompts
    t = time.perf_counter()
    metric = cfg.quality.metric
    second_metric = cfg.quality.also
    floor = cfg.quality.candidate_floor()
    eligible = [p for p in front if p.quality >= floor]
    if not eligible:
        notes.append(f"no front point reached trace agreement {floor:g}; confirming the most accurate ones")
        eligible = front[-cfg.confirm.top_k:]
    val_ref = Reference(val_ids, val_resp, worker.decode(val_resp))

    def confirm(p: Point) -> Point:
        if not p.thresholds and p.kind != "classifier":  # the final layer itself: nothing to measure
            c = Point(p.name, 1.0, 1.0, {}, "final", {"agreement": 1.0, "scored_on": "definition",
                                                      "trace_flops_ratio": 1.0, "trace_agreement": 1.0})
        else:
            c = confirm_candidates(worker, val_ref, [p], metric, cfg.prompts.max_new_tokens, cfg.confirm.batch_size,
                                   cfg.kv, probe=probe, check_vocab=cfg.check_vocab, check_vocab_file=check_file,
                                   second_metric=second_metric)[0]
        console.print(f"  confirmed {c.name}: FLOPs ratio {c.flops_ratio:.3f} (traces "
                      f"{c.extra['trace_flops_ratio']:.3f}), {metric} {c.quality:.3f}, token agreement "
                      f"{c.extra['agreement']:.3f}  {_fmt_thr(c.thresholds)} {c.extra.get('check_head') or ''}")
        return c

    if cfg.confirm.strategy == "bisect":
        confirmed = bisect_front(eligible, confirm, cfg.quality.min, cfg.confirm.top_k)
    else:
        confirmed = [confirm(p) for p in spread(eligible, cfg.confirm.top_k)]
    seconds["confirm"] = time.perf_counter() - t
    tuned = [c for c in confirmed if c.thresholds]
    ok = [c for c in tuned if c.quality >= cfg.quality.min and (
        second_metric is None or c.extra.get(second_metric, 1.0) >= cfg.quality.min)]
    constraint_met = bool(ok) or (any(c.kind == "final" for c in confirmed) and not tuned)
    if ok:
        best_tuned = min(ok, key=lambda c: (c.flops_ratio, -c.quality))
    elif tuned:
        best_tuned = max(tuned, key=lambda c: (c.quality, -c.flops_ratio))
    else:
        best_tuned = None
    chosen = best_tuned
    if best_tuned is None:
        notes.append("no threshold set on the front beats the final layer: exporting policy final (no early exit)")
        console.print("[yellow]no threshold set beats the final layer[/] on the traces (every trial is dominated "
                      "by it); exporting the final layer (policy final)")
        chosen = references[0]
    elif not constraint_met:
        notes.append(f"minimum {metric} {cfg.quality.min:g} NOT met: best confirmed set reaches "
                     f"{best_tuned.quality:.3f}")
        console.print(f"[bold red]constraint not met[/]: no confirmed threshold set reaches {metric} >= "
                      f"{cfg.quality.min:g}; best found {best_tuned.quality:.3f} at FLOPs ratio "
                      f"{best_tuned.flops_ratio:.3f} {_fmt_thr(best_tuned.thresholds)}")
    elif best_tuned.flops_ratio >= 1.0:
        notes.append(f"the cheapest set reaching the minimum costs {best_tuned.flops_ratio:.3f}x the final layer: "
                     "exporting policy final (no early exit)")
        console.print(f"[yellow]no tuned set saves FLOPs[/] at {metric} >= {cfg.quality.min:g} (cheapest: "
                      f"{best_tuned.flops_ratio:.3f}x); exporting the final layer (policy final)")
        chosen = Point("final", 1.0, 1.0, {}, "final", {"scored_on": "definition"})

    # 5. held-out report: the chosen set against the references, on prompts the search never saw
    report: list[Point] = []
    if report_texts:
        t = time.perf_counter()
        rep_ids = worker.encode(report_texts)
        rep_resp = worker.final_responses(rep_ids, cfg.prompts.max_new_tokens, cfg.prompts.batch_size)
        rep_ref = Reference(rep_ids, rep_resp, worker.decode(rep_resp))
        rows = [Point("tuned", best_tuned.flops_ratio, best_tuned.quality, best_tuned.thresholds, "trial",
                      {"policy": cfg.policy, **({"check_head": best_tuned.extra["check_head"]}
                                                if best_tuned.extra.get("check_head") else {})})
                ] if best_tuned is not None else []
        rows += [p for p in references if p.kind in ("preset", "classifier")]
        for p in rows:
            c = confirm_candidates(worker, rep_ref, [p], metric, cfg.prompts.max_new_tokens, cfg.confirm.batch_size,
                                   cfg.kv, classifier, kind=p.kind if p.kind != "trial" else "tuned", probe=probe,
                                   check_vocab=cfg.check_vocab, check_vocab_file=check_file,
                                   second_metric=second_metric)[0]
            report.append(c)
            console.print(f"  held-out {c.name}: FLOPs ratio {c.flops_ratio:.3f}, {metric} {c.quality:.3f}, "
                          + (f"{second_metric} {c.extra.get(second_metric, float('nan')):.3f}, " if second_metric
                             else "") + f"token agreement {c.extra['agreement']:.3f}")
        report.append(Point("final", 1.0, 1.0, {}, "final", {"agreement": 1.0, "scored_on": "definition",
                                                             "prompts": len(rep_ids)}))
        seconds["report"] = time.perf_counter() - t

    # 6. files
    files: dict[str, str] = {}
    trials_csv = write_points(result.trials, out_dir / "trials.csv")
    front_csv = write_points(front + references, out_dir / "front.csv")
    png = plot_front(result.trials, front, references, out_dir / "pareto.png",
                     title=f"{info.name}: exit thresholds ({len(result.trials)} trials, traces)",
                     confirmed=confirmed, chosen=best_tuned, min_quality=cfg.quality.min if metric == "agreement"
                     else None, confirmed_label=f"{metric} (real generation)", confirmed_min=cfg.quality.min)
    thr_path = Path(cfg.export.thresholds_file)
    thr_path = thr_path if thr_path.is_absolute() else out_dir / thr_path
    source = f"layerexit tune run {run.run_id}" if run is not None else f"layerexit tune {out_dir}"
    chosen_probe = probe if chosen.extra.get("policy") == "probe" else None
    write_thresholds_file(thr_path, info.name, L, chosen.thresholds, source, probe=chosen_probe)
    block = user_config_block(chosen.thresholds, cfg.kv, "probe" if chosen_probe is not None else "confidence",
                              thr_path, cfg.check_vocab)
    if chosen.thresholds and chosen.extra.get("check_head") and chosen_probe is None:
        from layerexit.tuning.confirm import check_fields

        block.pop("check_vocab", None)
        block.update(check_fields(chosen.extra["check_head"], check_file))
    if head_scorers:
        from layerexit.tuning.pareto import cheapest_at, fronts_by, plot_fronts

        by_head = fronts_by(result.trials, "check_head", references[0])
        files["pareto_heads_png"] = str(plot_fronts(
            by_head, out_dir / "pareto_heads.png", f"{info.name}: Pareto front per check head (traces)",
            oracle=oracle.flops_ratio))
        for head, hf in by_head.items():
            parts = []
            for q in (0.99, 0.95, 0.9):
                c = cheapest_at(hf, q)
                parts.append(f"agreement >= {q:g}: {c.flops_ratio:.3f}x" if c is not None else f">= {q:g}: -")
            notes.append(f"front of check head {head} ({len(hf)} points, traces): " + "; ".join(parts))
    uc_path = out_dir / "user_config.yaml"
    uc_path.write_text(user_config_yaml(block))
    files.update({"traces": str(out_dir / "traces.npz"), "trials": str(trials_csv), "front": str(front_csv),
                  "pareto_png": str(png), "thresholds": str(thr_path), "user_config": str(uc_path),
                  "ray_results": result.storage})
    if serve_config is not None:
        if constraint_met:
            rewrite_serve_config(serve_config, block, cfg.export.deployment, cfg.export.application,
                                 comment=f"tuned: {source}")
            files["serve_config"] = str(serve_config)
            console.print(f"rewrote user_config in {serve_config} (apply with `serve deploy {serve_config}`)")
        else:
            notes.append(f"{serve_config} left unchanged: the constraint was not met")
    if cfg.preset and run is not None and info.registered:  # policy final too: what the search confirmed
        from layerexit.tuning.export import register_exit_preset

        measured = {"flops_ratio": round(chosen.flops_ratio, 4), metric: round(chosen.quality, 4),
                    **({second_metric: round(float(chosen.extra[second_metric]), 4)}
                       if second_metric and second_metric in chosen.extra else {}),
                    "prompts": "validation", "constraint_met": constraint_met,
                    **{f"heldout_{k}": round(float(v), 4) for p in report if p.name == "tuned"
                       for k, v in (("flops_ratio", p.flops_ratio), (metric, p.quality),
                                    *(((second_metric, p.extra[second_metric]),) if second_metric in p.extra
                                      else ()))}}
        reg = register_exit_preset(info.registered[0], info.local_dir, cfg.preset, block, measured,
                                   out_dir / "model_with_presets", run.run_id, cfg.mlflow.tracking_uri)
        files["preset_model"] = reg["model_uri"]
        notes.append(f"registered preset {cfg.preset!r} with {info.registered[0]} version {reg['version']} (alias "
                     f"{cfg.preset}): {reg['model_uri']}")
        console.print(f"registered preset [bold]{cfg.preset}[/] as models:/{info.registered[0]}@{cfg.preset} "
                      f"(version {reg['version']})")
    outcome = TuneOutcome(constraint_met, chosen, dict(chosen.thresholds), block, best_tuned, result.trials,
                          result.failed, front, references, confirmed, report, files,
                          run.run_id if run is not None else None, seconds, notes)
    (out_dir / "report.md").write_text(render_report(cfg, outcome, info.name, len(val_texts), len(report_texts)))
    files["report"] = str(out_dir / "report.md")
    (out_dir / "summary.json").write_text(json.dumps(outcome.summary(), indent=2))
    files["summary"] = str(out_dir / "summary.json")
    seconds["total"] = time.perf_counter() - t0
    (out_dir / "summary.json").write_text(json.dumps(outcome.summary(), indent=2))
    console.print(f"chosen: {_fmt_thr(chosen.thresholds)}; files in {out_dir} ({seconds['total']:.0f} s)")
    return outcome


def _log_outcome(run, outcome: TuneOutcome, cfg: TuneSearchConfig, info) -> None:
    metrics = {"trials_ok": len(outcome.trials), "trials_failed": len(outcome.failed_trials),
               "front_size": len(outcome.front), "constraint_met": float(outcome.constraint_met)}
    if outcome.best_tuned is not None:
        metrics.update({"chosen_flops_ratio": outcome.best_tuned.flops_ratio,
                        f"chosen_{cfg.quality.metric}": outcome.best_tuned.quality})
    for p in outcome.report:
        if p.kind != "final":
            metrics[f"heldout_{p.name}_flops_ratio"] = p.flops_ratio
            metrics[f"heldout_{p.name}_{cfg.quality.metric}"] = p.quality
    metrics.update({f"seconds_{k}": v for k, v in outcome.seconds.items()})
    run.log_metrics(metrics)
    run.set_tags({"constraint_met": str(outcome.constraint_met).lower(),
                  "chosen_thresholds": json.dumps({str(k): v for k, v in outcome.thresholds.items()})})
    if "pareto_png" in outcome.files:  # the one-glance figure first (listed first in the MLflow UI)
        from layerexit.evaluation.mlflow_report import log_overview_png

        log_overview_png(run, outcome.files["pareto_png"], "pareto_front")
    for key in ("pareto_png", "pareto_heads_png", "trials", "front", "report", "summary", "user_config"):
        if key in outcome.files:
            run.log_artifact(outcome.files[key], "tune")
    run.log_artifact(outcome.files["thresholds"], "thresholds")
    if cfg.mlflow.attach_to_model_version and info.registered and outcome.constraint_met:
        from layerexit.tuning.mlflow_tune import attach_thresholds_to_model_version

        name, version = info.registered
        attach_thresholds_to_model_version(name, version, outcome.thresholds, run.run_id,
                                           f"thresholds/{Path(outcome.files['thresholds']).name}",
                                           cfg.mlflow.tracking_uri)
        outcome.notes.append(f"tagged registered model {name} version {version} with the thresholds")


def render_report(cfg: TuneSearchConfig, o: TuneOutcome, model: str, n_val: int, n_report: int) -> str:
    m = cfg.quality.metric
    lines = [f"# Threshold search: {model}", "",
             f"- validation prompts: {n_val} ({cfg.prompts.validation.file or cfg.prompts.validation.split}, offset "
             f"{cfg.prompts.validation.offset}), {cfg.prompts.max_new_tokens} tokens; held-out report prompts: "
             f"{n_report}",
             f"- search: {cfg.search.algorithm}, {len(o.trials)} trials ok, {len(o.failed_trials)} failed; exits "
             f"{cfg.space.exit_layers}, non-increasing {cfg.space.non_increasing}, optional layers "
             f"{cfg.space.optional_layers}; policy {cfg.policy}; kv {cfg.kv}, trial FLOPs accounting: "
             f"{cfg.search.flops}",
             f"- constraint {m} >= {cfg.quality.min:g}: {'met' if o.constraint_met else 'NOT met'}",
             f"- exported: {_fmt_thr(o.thresholds)}", ""]
    lines += [f"- note: {n}" for n in o.notes]
    a = cfg.quality.also

    def also(p) -> str:
        v = p.extra.get(a, 1.0 if p.kind == "final" else None) if a else None
        return "" if not a else (" - |" if v is None else f" {v:.3f} |")

    lines += ["", "## Confirmation (validation prompts, real generation)", "",
              f"| candidate | check head | thresholds | FLOPs ratio (traces) | agreement (traces) | FLOPs ratio | {m} "
              "|" + (f" {a} |" if a else "") + " token agreement |",
              "|---|---|---|---|---|---|---|" + ("---|" if a else "") + "---|"]
    for c in o.confirmed:
        lines.append(f"| {c.name} | {c.extra.get('check_head') or cfg.check_vocab} | {_fmt_thr(c.thresholds)} | "
                     f"{c.extra.get('trace_flops_ratio') or 0:.3f} | "
                     f"{c.extra.get('trace_agreement') or 0:.3f} | {c.flops_ratio:.3f} | {c.quality:.3f} |{also(c)} "
                     f"{c.extra['agreement']:.3f} |")
    lines += ["", "## References on the validation traces", "", "| reference | FLOPs ratio | agreement |",
              "|---|---|---|"]
    lines += [f"| {p.name} | {p.flops_ratio:.3f} | {p.quality:.3f} |" for p in o.references]
    if o.report:
        lines += ["", "## Held-out prompts (not seen by the search)", "",
                  f"| method | FLOPs ratio | {m} |" + (f" {a} |" if a else "") + " token agreement | mean exit layer |",
                  "|---|---|---|" + ("---|" if a else "") + "---|---|"]
        for p in o.report:
            mel = p.extra.get("mean_exit_layer")
            lines.append(f"| {p.name} | {p.flops_ratio:.3f} | {p.quality:.3f} |{also(p)} "
                         f"{p.extra.get('agreement', 1.0):.3f} | {'-' if mel is None else f'{mel:.1f}'} |")
    return "\n".join(lines) + "\n"
