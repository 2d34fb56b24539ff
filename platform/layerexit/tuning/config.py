"""What a threshold search is (``tune/*.yaml``): model, search space, objective, budget, prompts, MLflow, export.

Loaded with ``load_config(TuneSearchConfig, path, overrides)``; every class forbids unknown keys, so a typo is an
error naming the field. Checks that need the model (exit layers inside its depth) happen once it is loaded.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from layerexit.config import StrictModel
from layerexit.engine.thresholds import PRESETS

QUALITY_METRICS = ("agreement", "spacy", "minilm")


def known_presets(value: list[str]) -> list[str]:
    """Field check: every name is one of the paper's threshold presets."""
    bad = [p for p in value if p not in PRESETS]
    if bad:
        raise ValueError(f"unknown presets {bad}; use {', '.join(PRESETS)}")
    return value


class ModelSettings(StrictModel):
    """Which model to tune and where it runs."""

    spec: str = Field("smollm2", description="smollm2, a local HF directory, a .gguf file, a hub id, or an MLflow "
                      "model URI (models:/name@alias, models:/name/3, runs:/<id>/model).")
    name: str | None = Field(None, description="Model name written into the thresholds file (default: from the spec).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights dtype.")
    device: str = Field("auto", description="auto (cuda when available, else cpu), cpu, cuda, cuda:1...")
    num_gpus: float = Field(0, ge=0, description="GPUs for the model. > 0: traces and confirmation runs happen in a "
                            "Ray actor holding that GPU (the driver of a RayJob usually has none); 0: in the driver.")


class SearchSpaceSettings(StrictModel):
    """Which exit layers take part and the range of each one's threshold."""

    exit_layers: list[int] | None = Field(
        None, description="Intermediate layers (1-based) whose threshold is searched. Unset: the layers the model was "
        "trained with exits at (its exit adapters, or the lite.exit_layers its training run recorded); a model that "
        "records none needs them listed.")
    threshold_range: tuple[float, float] = Field(
        (0.5, 1.0), description="[low, high] of every layer's top-1 probability threshold (unless layer_ranges says).")
    layer_ranges: dict[int, tuple[float, float]] = Field(
        default_factory=dict, description="Per-layer [low, high] overriding threshold_range, e.g. {8: [0.9, 1.0]}.")
    non_increasing: bool = Field(True, description="Thresholds may not increase with depth (the paper's presets "
                                 "have this shape: deep layers are trusted more).")
    optional_layers: bool = Field(
        False, description="The search may switch an exit layer off (no LM-head check there). Worth it where a head "
        "costs several layers (SmolLM2: one head ~ 8 layers).")
    decimals: int = Field(3, ge=1, le=6, description="Thresholds are rounded to this many decimals before scoring, "
                          "so what is scored is exactly what is exported.")

    @field_validator("exit_layers")
    @classmethod
    def _positive_unique(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        if any(l < 1 for l in value):
            raise ValueError("exit layers are 1-based: every layer must be >= 1")
        if len(set(value)) != len(value):
            raise ValueError("exit layers must be unique")
        return sorted(value)

    @field_validator("threshold_range")
    @classmethod
    def _unit_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        lo, hi = value
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"need 0 <= low <= high <= 1, got [{lo}, {hi}]")
        return value

    @field_validator("layer_ranges")
    @classmethod
    def _unit_ranges(cls, value: dict[int, tuple[float, float]]) -> dict[int, tuple[float, float]]:
        for layer, (lo, hi) in value.items():
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"layer {layer}: need 0 <= low <= high <= 1, got [{lo}, {hi}]")
        return value

    @model_validator(mode="after")
    def _ranges_name_exit_layers(self):
        if self.exit_layers is None:  # checked once the model's own exits are read (resolve_exit_layers)
            return self
        extra = sorted(set(self.layer_ranges) - set(self.exit_layers))
        if extra:
            raise ValueError(f"layer_ranges names layers {extra} that are not in exit_layers")
        return self

    def resolve_exit_layers(self, spec: str) -> tuple["SearchSpaceSettings", str | None]:
        """These settings with ``exit_layers`` filled from the model's training (``models.trained_for``) when unset,
        and a note saying where they came from; ConfigError naming the field when nothing records them."""
        if self.exit_layers is not None:
            return self, None
        from layerexit.errors import ConfigError
        from layerexit.models.trained_for import trained_exit_layers

        found = trained_exit_layers(spec)
        if found is None:
            raise ConfigError(f"space.exit_layers is unset and {spec} records no exit layers (no exit adapters, no "
                              "layerexit training run with lite.exit_layers)",
                              "list them, e.g. space.exit_layers=[8,12,16,20,24,28]")
        layers, source = found
        resolved = self.model_validate({**self.model_dump(), "exit_layers": layers})
        return resolved, f"exit layers {layers} from {source}"

    def range_of(self, layer: int) -> tuple[float, float]:
        return tuple(self.layer_ranges.get(layer, self.threshold_range))  # type: ignore[return-value]


class QualitySettings(StrictModel):
    """The quality side of the objective and the constraint the chosen thresholds must meet."""

    metric: Literal["agreement", "spacy", "minilm"] = Field(
        "spacy", description="Metric of the confirmation runs (and of the constraint): token agreement with the final "
        "layer's response, spaCy en_core_web_sm similarity (paper Table 2), or MiniLM embedding cosine. Trials "
        "themselves always score token agreement on traces (the cheap proxy).")
    also: Literal["agreement", "spacy", "minilm"] | None = Field(
        None, description="A second metric every confirmation also measures; the chosen set must reach `min` in "
        "both (e.g. metric spacy, also minilm).")
    min: float = Field(0.9, ge=0.0, le=1.0, description="Minimum mean quality (of `metric`) the chosen set must reach "
                       "in the confirmation runs; if none does, the best found is reported and the job exits 3.")
    min_trace_agreement: float | None = Field(
        None, ge=0.0, le=1.0, description="Candidates for confirmation must reach this trace agreement (default: "
        "`min` when metric is agreement, else 0).")

    def candidate_floor(self) -> float:
        if self.min_trace_agreement is not None:
            return self.min_trace_agreement
        return self.min if self.metric == "agreement" else 0.0


class SearchSettings(StrictModel):
    """How many trials, how many at once, which algorithm."""

    algorithm: Literal["optuna", "grid", "random"] = Field(
        "optuna", description="optuna: OptunaSearch multi-objective (TPE over FLOPs ratio and agreement); random: "
        "uniform samples; grid: every combination of grid_points per layer (must fit num_trials).")
    num_trials: int = Field(40, ge=1, description="Trial budget (grid: the grid's size may not exceed it).")
    max_concurrent: int = Field(2, ge=1, description="Trials running at once.")
    trial_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves per trial (trials are milliseconds of numpy).")
    grid_points: int = Field(3, ge=2, le=20, description="Grid: values per layer, spread evenly over its range.")
    seed: int = Field(0, description="Seed of the sampler (optuna, random).")
    seed_presets: list[str] = Field(
        default_factory=lambda: ["paper-7b", "paper-7b-aggressive"],
        description="optuna: presets mapped onto the model (clipped into the space) evaluated first.")
    anchor_points: bool = Field(
        True, description="optuna: also evaluate first every layer at its range's high end (the accurate end of the "
        "front) and, with optional layers, every layer off (the final layer alone).")
    flops: Literal["exact", "per-token"] = Field(
        "exact", description="How trials count FLOPs. exact: what the engine computes for one sequence under the "
        "search's `kv` (recompute: skipped layers catch up later, so exits mostly defer layer work; propagate: skipped "
        "layers cost only their K/V projections). per-token: exit depth + head checks, nothing else (optimistic).")
    verbose: int = Field(1, ge=0, le=3, description="Ray Tune console verbosity (0 silent).")
    batch_size: int = Field(
        1, ge=1, le=64, description="Score trials as Serve decodes: this many sequences in one batch, every step "
        "running all rows to the deepest exit among them (the batch rule). 1: each sequence's own FLOPs.")

    @field_validator("seed_presets")
    @classmethod
    def _known_presets(cls, value: list[str]) -> list[str]:
        return known_presets(value)


class PromptSlice(StrictModel):
    """A slice of the built-in instruction split, or of a JSONL prompt file."""

    split: Literal["train", "heldout"] = Field("train", description="Built-in instruction split (ignored with file).")
    file: str | None = Field(None, description="A JSONL prompt file ({\"prompt\": ...} per line) instead of the split.")
    offset: int = Field(0, ge=0, description="Skip this many prompts first.")
    limit: int = Field(20, ge=0, description="Use this many prompts (0: none; for `report` it skips that stage).")


class PromptSettings(StrictModel):
    """Validation prompts (traces + confirmation) and held-out report prompts, disjoint."""

    validation: PromptSlice = Field(default_factory=PromptSlice, description="Prompts the search sees.")
    report: PromptSlice = Field(
        default_factory=lambda: PromptSlice(split="heldout", limit=20),
        description="Held-out prompts the chosen set and the references are reported on (limit 0 skips).")
    max_new_tokens: int = Field(32, ge=1, description="Tokens the final layer generates per prompt (greedy).")
    batch_size: int = Field(4, ge=1, description="Prompts per batch for the final layer's greedy generation.")

    @model_validator(mode="after")
    def _disjoint(self):
        v, r = self.validation, self.report
        if v.limit < 1:
            raise ValueError("validation.limit must be >= 1: the search needs prompts")
        if r.limit == 0:
            return self
        same_source = (v.file is not None and v.file == r.file) or (v.file is None and r.file is None
                                                                    and v.split == r.split)
        if same_source and v.offset < r.offset + r.limit and r.offset < v.offset + v.limit:
            raise ValueError("validation and report prompts overlap: the report must use prompts the search did not "
                             "see (use split: heldout for report, or disjoint offsets)")
        return self


class ConfirmSettings(StrictModel):
    """Real generation for the best candidates of the front."""

    top_k: int = Field(3, ge=1, le=20, description="Most front points confirmed by real generation.")
    strategy: Literal["bisect", "spread"] = Field(
        "bisect", description="bisect: confirm the front's most accurate point, then bisect along the front for the "
        "cheapest point reaching quality.min (finds it in ~log2(front) runs if quality falls with cost); spread: "
        "top_k points evenly along the front.")
    batch_size: int = Field(1, ge=1, description="Prompts per engine batch. 1 measures each sequence's own FLOPs; a "
                            "batch runs to the deepest exit any of its rows needs.")


class ReferenceSettings(StrictModel):
    """Reference points on the Pareto plot and in the report."""

    presets: list[str] = Field(default_factory=lambda: ["paper-7b", "paper-7b-aggressive"],
                               description="Paper presets mapped onto the model's depth.")
    classifier: bool = Field(True, description="Train the AdaInfer classifier on the validation traces and show it.")
    classifier_min_precision: float = Field(0.9, gt=0.0, le=1.0, description="Its per-layer exit precision target.")

    @field_validator("presets")
    @classmethod
    def _known_presets(cls, value: list[str]) -> list[str]:
        return known_presets(value)


class TuneMlflowSettings(StrictModel):
    """MLflow: a parent run for the search, a nested run per trial."""

    enabled: bool = Field(True, description="Log the search to MLflow.")
    tracking_uri: str | None = Field(None, description="Tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                     "sqlite:///mlflow.db in the working directory).")
    experiment: str = Field("layerexit-tune", description="Experiment name.")
    run_name: str | None = Field(None, description="Parent run name (default: tune-<model>).")
    nested_trial_runs: bool = Field(True, description="One nested run per trial (FAILED for a crashed trial).")
    attach_to_model_version: bool = Field(True, description="When the model is models:/..., tag that model version "
                                          "with the chosen thresholds and the run holding the thresholds file.")


class ExportSettings(StrictModel):
    """Where the chosen thresholds go."""

    thresholds_file: str = Field("thresholds.yaml", description="Thresholds file name (relative: inside output_dir).")
    deployment: str = Field("EarlyExitLLM", description="Deployment whose user_config --serve-config rewrites.")
    application: str | None = Field(None, description="Application name in the Serve config (default: the one "
                                    "importing layerexit.serving.app).")


class TuneSearchConfig(StrictModel):
    """A threshold search (``jobs/tune_thresholds.py --config tune/<name>.yaml``)."""

    model: ModelSettings = Field(default_factory=ModelSettings)
    kv: Literal["recompute", "propagate", "none"] = Field(
        "recompute", description="KV strategy the thresholds are searched for, confirmed with and exported with. "
        "recompute: exact (trace decisions equal the engine's), but a skipped layer catches up when a later token "
        "goes deep, so FLOPs are mostly deferred, not saved. propagate (CALM): skipped layers get only K/V "
        "projections (real savings; deep layers see approximate K/V, so trace agreement is an estimate and the "
        "confirmation runs are what counts). none (the paper's setting): no cache, every token recomputes the prefix "
        "up to its exit layer (exact decisions, real savings, a far costlier baseline).")
    policy: Literal["confidence", "probe"] = Field(
        "confidence", description="What the thresholds gate. confidence: top-1 softmax probability, one LM-head "
        "evaluation per check (the paper). probe: a linear probe on the hidden state, fitted on the validation "
        "traces (needs their hidden states), decides; the head runs once, at the exit. Use probe where one LM head "
        "costs several decoder layers (small models, large vocabularies: SmolLM2's head = ~8 of its 30 layers).")
    check_vocab: int | Literal["full"] = Field(
        "full", description="How confidence checks are computed, searched for, confirmed with and exported with: "
        "\"full\" (every check is a full LM head) or an int K >= 1 (candidate-set checks: a token's first check is "
        "a full head keeping its top-K tokens, later checks score those K rows only). Ignored by policy probe.")
    check_heads: list[str] | None = Field(
        None, description="Check heads searched along with the thresholds (a categorical of the Tune space; policy "
        "confidence): \"full\", \"candidates:K\" (top-K of a token's first check) or \"static:N\" (the first N ids "
        "of check_vocab_file; a row that exits takes the full head's token). Unset: check_vocab alone.")
    check_vocab_file: str | None = Field(
        None, description="Static check vocabulary for static:N heads (`python -m layerexit.data.draft_vocab`, made "
        "for this model's tokenizer, at least max N ids). Unset: built from the model's own greedy answers on "
        "check_vocab_prompts training-split instructions, into output_dir.")
    check_vocab_prompts: int = Field(64, ge=1, description="Training-split instructions the model answers to build "
                                     "the static check vocabulary when check_vocab_file is unset.")
    preset: str | None = Field(
        "tuned", description="Name the confirmed setting is registered under with the model (exit_presets.json in "
        "a new version of the registered model, aliased with this name) when the model comes from the MLflow "
        "registry and the constraint is met; null: not registered.")
    space: SearchSpaceSettings
    quality: QualitySettings = Field(default_factory=QualitySettings)
    search: SearchSettings = Field(default_factory=SearchSettings)
    prompts: PromptSettings = Field(default_factory=PromptSettings)
    confirm: ConfirmSettings = Field(default_factory=ConfirmSettings)
    reference: ReferenceSettings = Field(default_factory=ReferenceSettings)
    mlflow: TuneMlflowSettings = Field(default_factory=TuneMlflowSettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    output_dir: str = Field("outputs/tune", description="Traces, Pareto front, report, exports and Ray results.")
    show_progress: bool = Field(True, description="Progress bars while generating and tracing.")

    @field_validator("check_heads")
    @classmethod
    def _known_heads(cls, value):
        if value is None:
            return value
        from layerexit.engine.traces import parse_check_spec

        if not value:
            raise ValueError("check_heads names no head: list full, candidates:K or static:N (or leave it unset)")
        for spec in value:
            parse_check_spec(spec)
        if len(set(value)) != len(value):
            raise ValueError("check_heads must be unique")
        return value

    @field_validator("check_vocab")
    @classmethod
    def _positive_k(cls, value):
        from layerexit.engine.options import check_vocab_value

        return check_vocab_value(value)
