"""The draft search for a model that ships an EAGLE-3 feature draft (``tune/*_eagle3.yaml``, ``draft: eagle3``):
Ray Tune picks the draft length k and the draft vocabulary size N, the choice is measured again by real decoding.

``jobs/tune_draft.py`` runs it when the config says ``draft: eagle3``. Steps:
1. the final layer's greedy answers to the search prompts (held out from the draft's training: on its own training
   answers a draft predicts several times its real acceptance), and the target's hidden states at the
   draft's aux layers along them (one forward each);
2. one Ray Tune trial per (N, k): the draft's head pruned to the N target ids the model emits most on those answers
   (``prune_vocab``; N = ``full`` keeps the trained head), its teacher-forced greedy acceptance chained k steps from
   every answer position (what greedy speculative decoding accepts; ``eagle3_recipe.draft_acceptance``), scored by
   the weight-bytes cost model: predicted speedup tau(k) / (1 + k c);
3. the best point decoded for real by our engine on the held-out report prompts (acceptance per draft position from
   the loop's counters, answers compared with ``final``'s token for token), and by vLLM (``method: eagle3``) when
   ``confirm.vllm``;
4. the chosen draft exported in vLLM's EAGLE-3 layout (``<output_dir>/eagle3-N``; N = full: the model's own
   ``eagle3/``), its k written into the Serve config, the registered model version tagged.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, Sequence

import torch
from pydantic import Field, field_validator

from layerexit.config import StrictModel
from layerexit.errors import ConfigError
from layerexit.tuning.config import PromptSettings, PromptSlice, TuneMlflowSettings
from layerexit.tuning.draft_config import DraftLengthRange, DraftModelSettings, VllmConfirmSettings

FULL = "full"


# ------------------------------------------------------------------------------------------------ config
class Eagle3SpaceSettings(DraftLengthRange):
    """The (draft vocabulary size, draft length) grid."""

    num_draft: tuple[int, int] = Field((1, 5), description="[low, high] of the draft length k (inclusive).")
    draft_vocab: list[int | Literal["full"]] = Field(
        default_factory=lambda: [FULL], description="Draft vocabulary sizes N to try: the trained head pruned to the "
        "N target ids the model emits most on the search prompts' answers; `full` keeps the trained head. Each N "
        "must be at most the trained head's size (checked when the draft is loaded).")

    @field_validator("draft_vocab")
    @classmethod
    def _sizes(cls, value: list) -> list:
        if not value:
            raise ValueError("list at least one size (or full)")
        if any(v != FULL and v < 1 for v in value):
            raise ValueError("draft vocabulary sizes must be >= 1 (or full)")
        if len(set(map(str, value))) != len(value):
            raise ValueError("draft vocabulary sizes must be unique")
        return value


class Eagle3TrialSettings(StrictModel):
    trial_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves per trial.")
    max_concurrent: int = Field(2, ge=1, description="Trials running at once.")
    verbose: int = Field(1, ge=0, le=3, description="Ray Tune console verbosity (0 silent).")


class Eagle3ExportSettings(StrictModel):
    draft_dir: str | None = Field(None, description="Where a pruned draft is written (vLLM's EAGLE-3 layout; "
                                  "default <output_dir>/eagle3-<N>). N = full serves the model's own draft.")
    serve_config: str | None = Field(None, description="A Serve config whose draft length is rewritten in place "
                                     "(vLLM: args.draft and args.num_draft; engine: a self-speculative eagle3 "
                                     "user_config); the job's --serve-config wins over this.")
    application: str | None = Field(None, description="Application in the Serve config (default: the one "
                                    "importing layerexit.serving).")
    min_speedup: float = Field(1.0, ge=0.0, description="Rewrite the Serve config only if the chosen point's "
                               "predicted speedup reaches this (else exit 3).")


class Eagle3TuneConfig(StrictModel):
    """An EAGLE-3 draft search (``jobs/tune_draft.py --config tune/<name>_eagle3.yaml``)."""

    draft: Literal["eagle3"] = Field(description="eagle3: search the model's shipped EAGLE-3 draft (k, N).")
    model: DraftModelSettings = Field(default_factory=DraftModelSettings)
    space: Eagle3SpaceSettings = Field(default_factory=Eagle3SpaceSettings)
    trials: Eagle3TrialSettings = Field(default_factory=Eagle3TrialSettings)
    prompts: PromptSettings = Field(
        default_factory=lambda: PromptSettings(validation=PromptSlice(split="heldout", limit=24),
                                               report=PromptSlice(split="heldout", offset=40, limit=8)),
        description="validation: the search's prompts, held out from the draft's training (scored on answers it "
        "trained on, a draft looks several times better than it is); report: other held-out prompts the choice is "
        "decoded on by our engine and vLLM.")
    confirm: VllmConfirmSettings = Field(default_factory=VllmConfirmSettings)
    mlflow: TuneMlflowSettings = Field(default_factory=TuneMlflowSettings)
    export: Eagle3ExportSettings = Field(default_factory=Eagle3ExportSettings)
    output_dir: str = Field("outputs/tune/eagle3", description="Summary, plot, the pruned draft, Ray results.")
    show_progress: bool = Field(False, description="Progress bars while loading and decoding.")


def is_eagle3_config(path: str | Path) -> bool:
    """Whether a tune YAML is an EAGLE-3 draft search (top-level ``draft: eagle3``)."""
    import yaml

    doc = yaml.safe_load(Path(path).read_text()) if Path(path).is_file() else None
    return isinstance(doc, dict) and doc.get("draft") == "eagle3"


# ---------------------------------------------------------------------------------------- pruning, scoring
def emitted_counts(answers: Sequence[Sequence[int]], vocab_size: int) -> torch.Tensor:
    """How often the model emitted each target id in these answers."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for a in answers:
        if a:
            counts += torch.bincount(torch.as_tensor(list(a), dtype=torch.long), minlength=vocab_size)
    return counts


def prune_vocab(draft, size: int | str, counts: torch.Tensor):
    """The draft with its head cut to the ``size`` of its target ids the model emits most (``counts``; ties: the
    lower id), every other weight shared. ``full`` (or the head's own size) returns ``draft``."""
    from dataclasses import replace

    from layerexit.models.eagle3 import Eagle3Draft

    n = draft.spec.draft_vocab_size
    if size == FULL or size == n:
        return draft
    if not 1 <= int(size) <= n:
        raise ConfigError(f"space.draft_vocab: {size} is larger than the trained draft head ({n} ids)",
                          f"use sizes in 1..{n} or full")
    ids = draft.draft_to_target.cpu()
    # Stable sort by count: equal counts keep the head's order (ascending target id).
    order = torch.sort(counts[ids], descending=True, stable=True).indices[: int(size)]
    keep = torch.sort(order).values  # draft ids, ascending: their target ids stay sorted, as set_vocab stores them
    small = Eagle3Draft(replace(draft.spec, draft_vocab_size=int(size)), draft._embed[0])
    state = {k: v for k, v in draft.state_dict().items() if k not in ("lm_head.weight", "d2t", "t2d")}
    small.load_state_dict(state, strict=False)
    with torch.no_grad():
        small.lm_head.weight.copy_(draft.lm_head.weight[keep.to(draft.lm_head.weight.device)])
    small.set_vocab(ids[keep])
    return small.to(draft.fc.weight.dtype).eval()


def score(acc, cost: float, k: int, size: int | str) -> dict[str, Any]:
    """One (N, k) point's figures."""
    per_position = list(acc.per_position[:k])
    out = {"draft_vocab": size, "num_draft": k, "cost_ratio": cost, "tau": acc.tau[k],
           "predicted_speedup": acc.predicted_speedup(k, cost), "acceptance_1": per_position[0] if per_position else 0.0,
           "starts": acc.starts}
    out.update({f"accept_pos_{i}": a for i, a in enumerate(per_position, start=1)})
    return out


@dataclass
class Eagle3TrialInputs:
    """What every trial gets through the object store."""

    state: dict[str, torch.Tensor]  # the trained draft's weights (embedding excluded)
    spec: Any  # its Eagle3Spec
    embed: torch.Tensor  # the target's input embedding
    counts: torch.Tensor
    sequences: list  # HeldoutSequence over the search answers
    model_bytes: int  # weight elements of the target's layers + norm + head (weight_cost's denominator)
    k_high: int


_CACHE: dict[Any, Any] = {}  # per trial process: one acceptance measurement per N


def evaluate_point(inputs: Eagle3TrialInputs, size: int | str, k: int) -> dict[str, Any]:
    """A trial's figures, without Ray."""
    from layerexit.models.eagle3 import Eagle3Draft
    from layerexit.training.eagle3_recipe import draft_acceptance

    key = (id(inputs.state), str(size))
    if key not in _CACHE:
        embed = torch.nn.Embedding.from_pretrained(inputs.embed, freeze=True)
        draft = Eagle3Draft(inputs.spec, embed)
        draft.load_state_dict(inputs.state, strict=False)
        small = prune_vocab(draft.eval(), size, inputs.counts)
        cost = sum(p.numel() for p in small.parameters()) / inputs.model_bytes
        _CACHE[key] = (draft_acceptance(small, inputs.sequences, inputs.k_high), cost)
    acc, cost = _CACHE[key]
    return score(acc, cost, k, size)


def _trial(config: dict, inputs: Eagle3TrialInputs) -> None:
    from ray import tune

    torch.set_num_threads(1)
    size = config["draft_vocab"]
    tune.report(evaluate_point(inputs, size if size == FULL else int(size), int(config["num_draft"])))


def best(trials: Sequence[dict]) -> dict:
    """The highest predicted speedup; ties go to the shorter draft, then the smaller head."""
    return max(trials, key=lambda t: (round(t["predicted_speedup"], 9), -t["num_draft"], -t["cost_ratio"]))


# ------------------------------------------------------------------------------------------------ the job
@dataclass
class Eagle3Outcome:
    chosen: dict
    trials: list[dict]
    failed: list[dict]
    engine: dict | None
    vllm: dict | None
    draft_dir: str
    serve_config: str | None
    rewritten: bool
    seconds: dict[str, float]
    notes: list[str] = field(default_factory=list)
    exit_code: int = 0
    mlflow_run_id: str | None = None

    def summary(self) -> dict:
        return {"chosen": self.chosen, "engine": self.engine, "vllm": self.vllm, "draft_dir": self.draft_dir,
                "serve_config": self.serve_config, "serve_config_rewritten": self.rewritten,
                "seconds": {k: round(v, 1) for k, v in self.seconds.items()}, "notes": self.notes,
                "trials": self.trials, "failed": self.failed, "mlflow_run_id": self.mlflow_run_id}


def engine_check(model, eos, pad, draft, prompts: Sequence[Sequence[int]], k: int, max_new: int,
                 batch_size: int) -> dict[str, Any]:
    """Real greedy decoding with the draft at k on our engine, against ``final`` on the same prompts: acceptance per
    draft position and tau from the loop's counters, identical answers, tokens/s of both (eager)."""
    from layerexit.engine.decode import EarlyExitEngine
    from layerexit.engine.bench import draft_stats
    from layerexit.engine.options import ExitConfig, SamplingParams

    engine = EarlyExitEngine(model, eos, pad)
    engine.attach_eagle3(draft)
    sampling = SamplingParams(max_new_tokens=max_new, temperature=0.0)
    out: dict[str, Any] = {}
    results = {}
    for name, cfg in (("final", ExitConfig(policy="final")),
                      ("eagle3", ExitConfig(policy="self-speculative", draft="eagle3", num_draft=k))):
        t0, rs = time.perf_counter(), []
        for i in range(0, len(prompts), batch_size):
            rs += engine.generate(prompts[i : i + batch_size], cfg, sampling)
        seconds = time.perf_counter() - t0
        results[name] = rs
        out[f"{name}_tokens_per_s"] = round(sum(len(r.token_ids) for r in rs) / seconds, 2)
    acceptance, tau = draft_stats(results["eagle3"])
    out.update({"acceptance_per_position": [round(a, 4) for a in acceptance or []], "tau": tau,
                "identical": sum(a.token_ids == b.token_ids for a, b in zip(results["final"], results["eagle3"])),
                "prompts": len(prompts), "num_draft": k,
                "eager_ratio": round(out["eagle3_tokens_per_s"] / out["final_tokens_per_s"], 3)})
    return out


def plot_front(trials: Sequence[dict], chosen: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for size in sorted({str(t["draft_vocab"]) for t in trials}, key=lambda s: (s == FULL, int(s) if s != FULL else 0)):
        pts = sorted((t for t in trials if str(t["draft_vocab"]) == size), key=lambda t: t["num_draft"])
        ax.plot([t["num_draft"] for t in pts], [t["predicted_speedup"] for t in pts], marker="o", label=f"N={size}")
    ax.scatter([chosen["num_draft"]], [chosen["predicted_speedup"]], s=120, facecolors="none", edgecolors="red",
               label="chosen")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("draft length k")
    ax.set_ylabel("predicted speedup (tau / (1 + k c))")
    ax.set_title("EAGLE-3 draft search")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_eagle3_tuning(cfg: Eagle3TuneConfig, serve_config: str | Path | None = None, console=None) -> Eagle3Outcome:
    """Search, confirm and export as ``cfg`` says (module docstring). ConfigError for bad input before any trial."""
    from rich.console import Console

    from layerexit.tuning.draft_search import require_vllm_env, serve_config_kind
    from layerexit.tuning.mlflow_tune import search_session
    from layerexit.tuning.search import prompt_texts

    console = console or Console(soft_wrap=True)
    serve_config = serve_config if serve_config is not None else cfg.export.serve_config
    if serve_config is not None:  # a bad path or application fails now
        check_serve_target(serve_config, cfg)
    if cfg.confirm.vllm:
        require_vllm_env(cfg)
    val_texts = prompt_texts(cfg.prompts.validation)
    report_texts = prompt_texts(cfg.prompts.report) if cfg.prompts.report.limit else []
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with search_session(cfg, "tune-draft", "tune-eagle3") as run:
        outcome = _run(cfg, serve_config, val_texts, report_texts, out_dir, console, run)
        if run is not None:
            outcome.mlflow_run_id = run.run_id
            _log(run, outcome, out_dir)
        (out_dir / "summary.json").write_text(json.dumps(outcome.summary(), indent=2, default=str))
        return outcome


def _run(cfg: Eagle3TuneConfig, serve_config, val_texts, report_texts, out_dir: Path, console, run) -> Eagle3Outcome:
    from ray import tune

    from layerexit.engine.drafters import find_eagle3
    from layerexit.models.eagle3 import check_target, load_eagle3, save_eagle3
    from layerexit.models.exits import decoder_parts
    from layerexit.training.eagle3_recipe import heldout_features
    from layerexit.tuning.confirm import ModelWorker
    from layerexit.tuning.draft_search import BELOW_MIN_SPEEDUP, VLLM_FAILED
    from layerexit.tuning.draft_vllm import confirm_with_vllm
    from layerexit.tuning.search import fit_trials

    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    notes: list[str] = []
    worker = ModelWorker(cfg.model.spec, cfg.model.dtype, cfg.model.device, cfg.show_progress, cfg.model.name)
    info = worker.info()
    path = find_eagle3(worker.model)
    if path is None:
        raise ConfigError(f"model.spec {cfg.model.spec}: ships no EAGLE-3 draft (no eagle3/ beside its weights)",
                          "train one with jobs/configs/smollm2_eagle3.yaml and use models:/<name>@trained")
    embed = worker.model.get_input_embeddings()
    draft = load_eagle3(path, embed, dtype=worker.model.dtype)
    check_target(draft.spec, worker.model.config, "model.spec")
    head = draft.spec.draft_vocab_size
    too_big = [n for n in cfg.space.draft_vocab if n != FULL and n > head]
    if too_big:
        raise ConfigError(f"space.draft_vocab: {too_big} larger than the trained draft head ({head} ids)",
                          f"use sizes in 1..{head} or full")
    seconds["load"] = time.perf_counter() - t0
    max_new, ks = cfg.prompts.max_new_tokens, cfg.space.ks

    t = time.perf_counter()
    val_ids = worker.encode(val_texts)
    answers = worker.generate(val_ids, {"policy": "final"}, max_new, cfg.prompts.batch_size)["token_ids"]
    examples = [SimpleNamespace(input_ids=list(p) + list(a), prompt_len=len(p)) for p, a in zip(val_ids, answers)]
    sequences = heldout_features(worker.model, examples, draft.spec.aux_layers)
    seconds["features"] = time.perf_counter() - t
    parts = decoder_parts(worker.model)
    model_bytes = sum(p.numel() for layer in parts.layers for p in layer.parameters())
    model_bytes += parts.head.weight.numel() + sum(p.numel() for p in parts.norm.parameters())
    counts = emitted_counts(answers, draft.spec.vocab_size)
    state = {k: v.detach().cpu().float() for k, v in draft.state_dict().items()}
    inputs = Eagle3TrialInputs(state, draft.spec, embed.weight.detach().cpu().float(), counts, sequences, model_bytes,
                               ks[-1])
    console.print(f"[bold]EAGLE-3 draft search[/] {cfg.model.spec}: aux layers {list(draft.spec.aux_layers)}, head "
                  f"{head} ids; N {cfg.space.draft_vocab} x k {ks[0]}..{ks[-1]}; {len(val_ids)} search prompts "
                  f"({sum(map(len, answers))} answer tokens, {seconds['features']:.0f} s)")

    trainable = tune.with_resources(tune.with_parameters(_trial, inputs=inputs), {"cpu": cfg.trials.trial_cpus})
    space = {"num_draft": tune.grid_search(ks), "draft_vocab": tune.grid_search(list(cfg.space.draft_vocab))}
    finished, errors, seconds["search"], _ = fit_trials(
        trainable, space, name="tune-eagle3", storage_dir=(out_dir / "ray_results").resolve(),
        max_concurrent=cfg.trials.max_concurrent, verbose=cfg.trials.verbose, callbacks=(),
        required_metric="predicted_speedup")
    failed = [{"trial_id": i, "config": r.config, "error": e} for i, r, e in errors]
    trials = [{"trial_id": i, **r.metrics} for i, r in finished]
    trials = [{k: v for k, v in tr.items() if k in ("trial_id", "draft_vocab", "num_draft", "cost_ratio", "tau",
                                                    "predicted_speedup", "acceptance_1", "starts")
               or k.startswith("accept_pos_")} for tr in trials]
    if not trials:
        raise ConfigError(f"all {len(failed)} trials failed", "see the trial errors in ray_results")
    chosen = dict(best(trials))
    size, k = chosen["draft_vocab"], int(chosen["num_draft"])
    for tr in sorted(trials, key=lambda x: (str(x["draft_vocab"]), x["num_draft"])):
        console.print(f"  N {tr['draft_vocab']!s:>5} k {tr['num_draft']}: tau {tr['tau']:.2f}, cost "
                      f"{tr['cost_ratio']:.3f}, predicted {tr['predicted_speedup']:.2f}x")
    console.print(f"chosen: N {size}, k {k} (predicted {chosen['predicted_speedup']:.2f}x)")

    chosen_draft = prune_vocab(draft, size, counts)
    engine = None
    if report_texts:
        t = time.perf_counter()
        engine = engine_check(worker.model, worker.eos, worker.pad, chosen_draft, worker.encode(report_texts), k,
                              max_new, cfg.prompts.batch_size)
        seconds["engine"] = time.perf_counter() - t
        console.print(f"held-out ({engine['prompts']} prompts, our engine, {cfg.model.dtype}): acceptance by position "
                      + " ".join(f"{a:.2f}" for a in engine["acceptance_per_position"])
                      + f", tau {engine['tau'] or 0:.2f}, identical to final {engine['identical']}/{engine['prompts']},"
                      f" eager {engine['eager_ratio']:.2f}x final")

    if size == FULL:
        draft_dir = path
    else:
        draft_dir = Path((cfg.export.draft_dir or str(out_dir / "eagle3-{n}")).replace("{n}", str(size)))
        save_eagle3(chosen_draft, draft_dir)
    gc.collect()

    vllm, exit_code = None, 0
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

    rewritten = False
    if chosen["predicted_speedup"] < cfg.export.min_speedup:
        notes.append(f"predicted speedup {chosen['predicted_speedup']:.3f} is below export.min_speedup "
                     f"{cfg.export.min_speedup:g}" + (f"; {serve_config} left unchanged" if serve_config else ""))
        exit_code = exit_code or BELOW_MIN_SPEEDUP
    elif serve_config is not None and exit_code == 0:
        rewrite_eagle3_serve(serve_config, "shipped" if size == FULL else str(Path(draft_dir).resolve()), k,
                             cfg.export.application,
                             f"tuned: N {size}, k {k}, predicted {chosen['predicted_speedup']:.2f}x")
        rewritten = True
        console.print(f"rewrote {serve_config}: EAGLE-3 draft, k {k}")
    if exit_code == 0 and info.registered is not None and cfg.mlflow.enabled:
        _tag_version(cfg, info.registered, chosen, run.run_id if run is not None else "")
    seconds["total"] = time.perf_counter() - t0
    return Eagle3Outcome(chosen, trials, failed, engine, vllm, str(draft_dir),
                         str(serve_config) if serve_config else None, rewritten, seconds, notes, exit_code)


def check_serve_target(path: str | Path, cfg: Eagle3TuneConfig) -> None:
    """Before any trial: the Serve config exists and can take what the search may choose (our engine drafts with the
    model's own head, so an engine config takes ``draft_vocab: [full]`` only)."""
    from layerexit.tuning.draft_search import serve_config_kind

    if serve_config_kind(path, cfg.export.application) == "engine" and cfg.space.draft_vocab != [FULL]:
        raise ConfigError(f"space.draft_vocab {cfg.space.draft_vocab}: {path} is an engine Serve config, and our "
                          "engine drafts with the model's own eagle3/ head (a pruned head is served by vLLM)",
                          "use space.draft_vocab: [full], or a vLLM Serve config (serve_configs/smollm2_vllm.yaml)")


def rewrite_eagle3_serve(path: str | Path, draft: str, k: int, application: str | None, comment: str) -> None:
    """vLLM config: ``args.draft`` (``shipped`` or an exported draft directory) and ``args.num_draft``; engine
    config: a self-speculative EAGLE-3 ``user_config`` (our engine drafts with the model's own ``eagle3/``)."""
    from layerexit.tuning.draft_search import rewrite_serve_draft, serve_config_kind
    from layerexit.tuning.export import rewrite_serve_config

    if serve_config_kind(path, application) == "engine":
        if draft != "shipped":
            raise ConfigError(f"{path}: our engine drafts with the model's own eagle3/ (a pruned head is served by "
                              "vLLM only)", "use space.draft_vocab: [full] for an engine Serve config")
        rewrite_serve_config(path, {"policy": "self-speculative", "draft": "eagle3", "num_draft": k},
                             application=application, comment=comment)
        return
    rewrite_serve_draft(path, draft, 0, k, application, comment)


def _tag_version(cfg: Eagle3TuneConfig, model_version: tuple[str, str], chosen: dict, run_id: str) -> None:
    from mlflow import MlflowClient

    from layerexit.tracking import _retry, resolve_tracking_uri

    name, version = model_version
    client = MlflowClient(tracking_uri=resolve_tracking_uri(cfg.mlflow.tracking_uri))
    for key, value in {"layerexit.draft.kind": "eagle3", "layerexit.draft.num_draft": chosen["num_draft"],
                       "layerexit.draft.draft_vocab": chosen["draft_vocab"],
                       "layerexit.draft.predicted_speedup": f"{chosen['predicted_speedup']:.4f}",
                       "layerexit.draft.run_id": run_id}.items():
        _retry(client.set_model_version_tag, name, str(version), key, str(value))


def _log(run, o: Eagle3Outcome, out_dir: Path) -> None:
    c = o.chosen
    metrics = {"chosen/num_draft": c["num_draft"], "chosen/predicted_speedup": c["predicted_speedup"],
               "chosen/tau": c["tau"], "chosen/cost_ratio": c["cost_ratio"]}
    if c["draft_vocab"] != FULL:
        metrics["chosen/draft_vocab"] = c["draft_vocab"]
    if o.engine:
        metrics.update({"heldout/engine_tau": o.engine["tau"] or 0.0, "heldout/identical": o.engine["identical"],
                        "heldout/eager_ratio": o.engine["eager_ratio"]})
        metrics.update({f"heldout/accept_pos_{i}": a
                        for i, a in enumerate(o.engine["acceptance_per_position"], start=1)})
    if o.vllm and "with_draft" in o.vllm:
        metrics["heldout/vllm_acceptance"] = o.vllm["with_draft"].get("spec_decode", {}).get("acceptance", 0.0)
    run.log_metrics(metrics)
    run.log_dict(o.summary(), "eagle3_search.json")
    run.log_artifact(plot_front(o.trials, c, out_dir / "eagle3_search.png"))


def eagle3_command(config: str | Path, overrides: Sequence[str] = (), serve_config: str | Path | None = None,
                   check_only: bool = False) -> int:
    """``jobs/tune_draft.py`` on a ``draft: eagle3`` config: 0 done (or valid with ``check_only``), 2 bad input (one
    line on stderr), 3 predicted speedup below export.min_speedup, 4 the vLLM confirmation failed."""
    import sys

    from layerexit.config import load_config
    from layerexit.errors import LayerexitError
    from layerexit.tuning.draft_search import require_vllm_env, serve_config_kind

    try:
        cfg = load_config(Eagle3TuneConfig, config, list(overrides))
        target = serve_config if serve_config is not None else cfg.export.serve_config
        if check_only:
            if target is not None:
                check_serve_target(target, cfg)
            note = require_vllm_env(cfg, missing_auto_ok=True) if cfg.confirm.vllm else None
            print(f"config {config} is valid: model {cfg.model.spec}, EAGLE-3 draft, N {cfg.space.draft_vocab} x k "
                  f"{cfg.space.ks[0]}..{cfg.space.ks[-1]}: {len(cfg.space.draft_vocab) * len(cfg.space.ks)} trials; "
                  f"vLLM confirmation {'on (' + cfg.confirm.python + ')' if cfg.confirm.vllm else 'off'}")
            if note:
                print(f"note: {note}")
            return 0
        outcome = run_eagle3_tuning(cfg, serve_config=serve_config)
    except LayerexitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for note in outcome.notes:
        print(f"note: {note}", file=sys.stderr)
    return outcome.exit_code
