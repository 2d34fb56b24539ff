"""What an evaluation run is: one model, prompt sets, named exit configurations, quality metrics, judge, MLflow.

Loaded from YAML (``jobs/configs/eval_*.yaml``) with ``load_config(EvalConfig, path, overrides)``. Every class
forbids unknown keys, so a misspelt field is an error that names it.
"""

from __future__ import annotations

import re

from pydantic import Field, field_validator, model_validator

from layerexit.config import StrictModel, one_of
from layerexit.engine.options import KV_STRATEGIES, ExitConfig

_METHOD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def metric_safe_name(value: str) -> str:
    """Field check: the name becomes part of MLflow metric names."""
    if not _METHOD_NAME.match(value):
        raise ValueError("use letters, digits, '_', '-', '.' (it becomes part of metric names)")
    return value


class PromptSetConfig(StrictModel):
    """One prompt set: a built-in name, a local JSONL file, or a hub dataset."""

    name: str = Field(
        "heldout",
        description="Label in tables and metric names. Built-in sources: 'heldout' (the project's held-out "
        "instructions, offline), 'vicuna', 'koala', 'wizardlm', 'self-instruct' (the paper's test sets, from the hub "
        "when reachable). Any other name needs `path` or `hub`.",
    )
    path: str | None = Field(None, description="Local JSONL file (one object per line with prompt/instruction/"
                             "question/turns; optional category/input). Takes precedence over the hub.")
    hub: str | None = Field(None, description="Hub dataset id (or a json/jsonl URL) overriding the built-in source.")
    hub_config: str | None = Field(None, description="Hub dataset configuration name.")
    split: str | None = Field(None, description="Hub split (default: the built-in source's, else 'train').")
    data_files: str | None = Field(None, description="File inside the hub dataset to read (json/jsonl).")
    limit: int | None = Field(None, ge=1, description="Use only N prompts (quick runs): the first of each category "
                              "in turn, or the first N when the set has no categories.")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        return metric_safe_name(value)


class EvalMethod(ExitConfig):
    """One exit configuration to evaluate: an ExitConfig (policy, thresholds, kv, ...) plus its name."""

    name: str = Field(description="Row label and MLflow nested-run name, e.g. 'lite-paper-7b'.")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        return metric_safe_name(value)

    def exit_config(self, default_kv: str) -> ExitConfig:
        """The engine's ExitConfig; ``kv`` comes from the eval config unless this method set it."""
        data = self.model_dump(exclude={"name"})
        if "kv" not in self.model_fields_set:
            data["kv"] = default_kv
        return ExitConfig.model_validate(data)


class JudgeConfig(StrictModel):
    """An LLM judge behind any OpenAI-compatible endpoint (paper Appendix A protocol)."""

    url: str | None = Field(None, description="Base URL, e.g. http://127.0.0.1:8000/v1 (its /chat/completions is "
                            "called). null disables the judge.")
    model: str | None = Field(None, description="Model name sent to the endpoint.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key (optional).")
    temperature: float = Field(0.0, ge=0.0, description="Sampling temperature of the judge (paper: 0).")
    max_tokens: int = Field(64, ge=1, description="Tokens the judge may answer with.")
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout.")
    retries: int = Field(3, ge=0, description="Retries per request after a failure or an unparseable reply.")
    backoff_s: float = Field(1.0, ge=0, description="First retry delay; doubles on every further retry.")
    max_consecutive_failures: int = Field(
        3, ge=1, description="After this many requests in a row failed at the transport level, the endpoint is "
        "treated as down and the judge columns say 'unavailable'.")
    concurrency: int = Field(4, ge=1, le=64, description="Requests in flight at once.")

    @property
    def enabled(self) -> bool:
        return bool(self.url)


class SimilarityConfig(StrictModel):
    """Which response-similarity metrics to compute (token agreement is always computed)."""

    spacy: bool = Field(True, description="spaCy en_core_web_sm Doc.similarity (paper Table 2).")
    embedding: bool = Field(True, description="Cosine of all-MiniLM-L6-v2 sentence embeddings.")


class AlignmentEvalConfig(StrictModel):
    """Per-layer alignment (Fig. 5) and confidence vs alignment (Fig. 6) on the first prompt set."""

    enabled: bool = Field(True, description="Compute and plot alignment for the evaluated model.")
    label: str | None = Field(None, description="Legend label of the evaluated model (default: its spec).")
    compare_models: dict[str, str] = Field(
        default_factory=dict,
        description="More models on the same plot, label -> model spec (e.g. {'standard IT': 'smollm2'}).",
    )


class MlflowConfig(StrictModel):
    """Where the evaluation is logged."""

    enabled: bool = Field(True, description="Log params, metrics and the report to MLflow.")
    tracking_uri: str | None = Field(None, description="Tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                     "sqlite:///mlflow.db).")
    experiment: str = Field("layerexit-eval", description="Experiment name.")
    run_name: str | None = Field(None, description="Parent run name (default: eval-<model>).")


class EvalConfig(StrictModel):
    """An evaluation run (see jobs/evaluate.py)."""

    model: str = Field("smollm2", description="smollm2, a local HF directory, a .gguf file, an MLflow model URI (models:/name@alias), or a hub id.")
    prompt_sets: list[PromptSetConfig] = Field(
        default_factory=lambda: [PromptSetConfig()], min_length=1,
        description="Prompt sets; the first one also feeds the alignment figures.")
    methods: list[EvalMethod] = Field(min_length=1, description="Named exit configurations, evaluated in order.")
    kv: str = Field("recompute", description="KV strategy for the final-layer reference and for every method that "
                    "does not set its own: none (the paper's), recompute (exact), propagate (CALM).")
    max_new_tokens: int = Field(64, ge=1, description="Tokens generated per prompt and method.")
    batch_size: int = Field(1, ge=1, description="Prompts per engine batch. 1 measures each sequence's own FLOPs; a "
                            "batch runs to the deepest exit any of its rows needs (the engine's batch rule).")
    seed: int = Field(0, description="Seed of the random baselines.")
    reuse_reference: bool = Field(True, description="A `final` method with the reference's KV strategy reuses the "
                                  "reference responses instead of generating them again.")
    similarity: SimilarityConfig = Field(default_factory=SimilarityConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    alignment: AlignmentEvalConfig = Field(default_factory=AlignmentEvalConfig)
    output_dir: str = Field("outputs/eval", description="Report, figures and JSON are written here.")
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    show_progress: bool = Field(True, description="Progress bars over prompts.")
    torch_threads: int | None = Field(None, ge=1, description="torch.set_num_threads for the run (null: torch's "
                                      "default). 1 is much faster on a busy shared CPU.")

    @field_validator("kv")
    @classmethod
    def _known_kv(cls, value: str) -> str:
        return one_of(value, KV_STRATEGIES, "KV strategy")

    @model_validator(mode="after")
    def _unique_names(self):
        for what, names in (("methods", [m.name for m in self.methods]),
                            ("prompt_sets", [p.name for p in self.prompt_sets])):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"{what} names must be unique, repeated: {', '.join(dup)}")
        return self


def default_methods() -> list[EvalMethod]:
    """The paper's configurations and baselines, mapped to any model's depth (what eval_smollm2.yaml lists)."""
    return [
        EvalMethod(name="final", policy="final"),
        EvalMethod(name="lite-paper-7b", policy="confidence", thresholds="paper-7b"),
        EvalMethod(name="lite-aggressive", policy="confidence", thresholds="paper-7b-aggressive"),
        EvalMethod(name="random", policy="random", thresholds="paper-7b"),
        EvalMethod(name="random-uniform", policy="random-uniform", thresholds="paper-7b"),
        EvalMethod(name="sequential", policy="sequential", thresholds="paper-7b"),
    ]


def default_eval_config(model: str = "smollm2", **updates) -> EvalConfig:
    """An EvalConfig with the default methods (plus fixed exits at 1/2 and 3/4 depth need a known depth: add them
    in YAML, e.g. ``{name: fixed-16, policy: fixed, layer: 16}``)."""
    return EvalConfig(model=model, methods=default_methods(), **updates)
