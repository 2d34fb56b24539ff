"""What a caller asks the engine for: how to exit (ExitConfig) and how to sample (SamplingParams)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from typing import Literal

from pydantic import Field, field_validator, model_validator

from layerexit.config import StrictModel, one_of
from layerexit.engine.drafters import DRAFT_SOURCES
from layerexit.engine.policies import (
    POLICY_NAMES,
    ClassifierPolicy,
    ConfidencePolicy,
    ExitPolicy,
    FinalPolicy,
    ProbePolicy,
    FixedPolicy,
    RandomPolicy,
    SequentialPolicy,
)
from layerexit.engine.thresholds import PRESETS, LinearClassifier, LinearProbe, load_thresholds_file, map_preset
from layerexit.errors import ConfigError

KV_STRATEGIES = ("none", "propagate", "recompute")
DEFAULT_PRESET = "paper-7b"
MAX_TOP_LOGPROBS = 20


def check_vocab_value(value: int | str) -> int | str:
    """A ``check_vocab`` setting: \"full\" or an int K >= 1 (the vocabulary bound is checked against a model)."""
    if value != "full" and int(value) < 1:
        raise ValueError(f"check_vocab must be \"full\" or an integer K >= 1, got {value}")
    return value


class ExitConfig(StrictModel):
    """Exit policy + thresholds + KV strategy, validated; ``build_policy`` checks it against a model."""

    policy: str = Field("final", description=f"One of {', '.join(POLICY_NAMES)}.")
    thresholds: str | dict[int, float] | None = Field(
        None, description=f"A preset ({', '.join(PRESETS)}), a thresholds file path, or {{layer: threshold}}."
    )
    exit_layers: list[int] | None = Field(
        None, description="Checkpoint layers for random/random-uniform/sequential (default: the thresholds' layers)."
    )
    layer: int | None = Field(None, ge=1, description="Exit layer for `fixed`; draft layer for `self-speculative`.")
    kv: str = Field("recompute", description="KV strategy for skipped layers: none, propagate, recompute.")
    num_draft: int = Field(4, ge=1, le=32, description="Draft tokens per verification (self-speculative); the most "
                           "a draft may hold when `draft_stop` is set.")
    check_vocab: int | Literal["full"] = Field(
        "full", description="Exit checks over the full vocabulary (\"full\") or over the top-K candidates of a "
        "token's first check (an int K >= 1: later checks and the exit token score only those K rows).")
    check_head: Literal["full", "candidates", "static"] | None = Field(
        None, description="The head exit checks score over (per-token policies that read logits: confidence, "
        "classifier). full: the whole LM head at every check. candidates: the first check is a full head keeping each "
        "row's top-`check_vocab` tokens, later checks score those only. static: every check scores the first "
        "`check_vocab` ids of `check_vocab_file` (a static vocabulary built from the model's own answers, ~2*H*N "
        "FLOPs), and a row that exits takes its token from the full head at its exit layer (the full head's argmax "
        "there, exactly). Unset: candidates when check_vocab is an int, else full.")
    check_vocab_file: str | None = Field(
        None, description="Static check vocabulary (check_head static): a `python -m layerexit.engine.draft_vocab` "
        "file for this model's tokenizer, ids most frequent first; its first `check_vocab` ids are scored.")
    preset: str | None = Field(
        None, description="An exit setting the model ships (exit_presets.json, written by the threshold search), "
        "e.g. \"tuned\": its fields apply where this config sets nothing explicitly.")
    draft: str = Field("layer", description="Self-speculative draft source: layer, ngram, layer+ngram, or eagle3 (the "
                       "model's EAGLE-3 feature draft, shipped as eagle3/ beside its weights; drafts num_draft tokens "
                       "from the verified prefix's own hidden states).")
    draft_stop: float | None = Field(
        None, gt=0.0, lt=1.0, description="End a layer draft at the first token whose draft probability is below "
        "this (dynamic draft length); unset keeps `num_draft` fixed.")
    draft_vocab: str | None = Field(None, description="Draft vocabulary file (`python -m layerexit.engine.draft_vocab`): the layer "
                                    "draft scores only those tokens (self-speculative).")
    classifier: LinearClassifier | None = Field(None, description="AdaInfer classifier (policy=classifier).")
    probe: LinearProbe | None = Field(None, description="Hidden-state probe (policy=probe).")

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        return one_of(value, POLICY_NAMES, "policy")

    @field_validator("draft")
    @classmethod
    def _known_draft(cls, value: str) -> str:
        return one_of(value, DRAFT_SOURCES, "draft source")

    @field_validator("check_vocab")
    @classmethod
    def _positive_k(cls, value):
        return check_vocab_value(value)

    @field_validator("kv")
    @classmethod
    def _known_kv(cls, value: str) -> str:
        return one_of(value, KV_STRATEGIES, "KV strategy")

    @field_validator("thresholds")
    @classmethod
    def _unit_range(cls, value):
        if isinstance(value, dict):
            bad = {k: v for k, v in value.items() if not 0.0 <= float(v) <= 1.0}
            if bad:
                raise ValueError(f"thresholds must be in [0, 1], got {bad}")
        return value

    @model_validator(mode="after")
    def _policy_needs(self):
        if self.policy == "fixed" and self.layer is None:
            raise ValueError("policy 'fixed' needs `layer`")
        if isinstance(self.check_vocab, bool):
            raise ValueError("check_vocab must be \"full\" or an integer K >= 1")
        if self.check_head in ("candidates", "static") and self.check_vocab == "full":
            raise ValueError(f"check_head {self.check_head!r} needs check_vocab, an integer size (K or N)")
        if self.check_head == "full" and self.check_vocab != "full":
            raise ValueError("check_head 'full' scores the whole vocabulary: leave check_vocab unset (\"full\")")
        if self.check_head == "static" and not self.check_vocab_file and self.preset is None:
            raise ValueError("check_head 'static' needs check_vocab_file (a static vocabulary file)")
        return self

    def resolved_check_head(self) -> str:
        """full, candidates or static (check_head, else inferred from check_vocab)."""
        if self.check_head is not None:
            return self.check_head
        return "full" if self.check_vocab == "full" else "candidates"

    def resolved_thresholds(self, num_layers: int):
        """Turn the thresholds field into ({layer: threshold}, classifier, probe) for this model; classifier
        and probe come from the config or from the thresholds file."""
        value = self.thresholds
        classifier = self.classifier
        probe = self.probe
        if value is None:
            value = DEFAULT_PRESET
        if isinstance(value, str):
            if value in PRESETS:
                table = map_preset(value, num_layers)
            elif Path(value).suffix in (".yaml", ".yml", ".json") or Path(value).exists():
                tf = load_thresholds_file(value)
                tf.check_model(num_layers)
                table = dict(tf.thresholds)
                classifier = classifier or tf.classifier
                probe = probe or tf.probe
            else:
                raise ConfigError(
                    f"thresholds {value!r} is neither a preset nor a file",
                    f"use one of {', '.join(PRESETS)} or a path to a thresholds YAML/JSON",
                )
        else:
            table = {int(k): float(v) for k, v in value.items()}
        bad = [l for l in table if not 1 <= l < num_layers]
        if bad:
            raise ConfigError(
                f"thresholds name layers {bad} that are not intermediate layers of this {num_layers}-layer model",
                f"use layers 1..{num_layers - 1}",
            )
        return table, classifier, probe

    def build_policy(self, num_layers: int) -> ExitPolicy:
        """The policy object for a model with ``num_layers`` layers (raises ConfigError on mismatch)."""
        if self.layer is not None and self.layer > num_layers:
            raise ConfigError(f"layer {self.layer} does not exist: the model has layers 1..{num_layers}",
                              f"choose a layer between 1 and {num_layers}")
        if self.policy == "final":
            return FinalPolicy(num_layers)
        if self.policy == "fixed":
            return FixedPolicy(self.layer, num_layers)
        if self.policy == "self-speculative":
            return FixedPolicy(self.layer or max(1, num_layers // 2), num_layers)
        table, classifier, probe = self.resolved_thresholds(num_layers)
        if self.exit_layers is not None:
            bad = [l for l in self.exit_layers if not 1 <= l < num_layers]
            if bad:
                raise ConfigError(f"exit_layers {bad} are not intermediate layers of this {num_layers}-layer model",
                                  f"use layers 1..{num_layers - 1}")
        layers = self.exit_layers or sorted(table)
        if self.policy == "confidence":
            return ConfidencePolicy(table, num_layers)
        if self.policy == "classifier":
            if classifier is None:
                raise ConfigError("policy 'classifier' needs a classifier",
                                  "train one with `layerexit train-classifier` and pass its thresholds file")
            return ClassifierPolicy(classifier, num_layers)
        if self.policy == "probe":
            if probe is None:
                raise ConfigError("policy 'probe' needs a probe",
                                  "train one with `layerexit train-classifier --kind probe` and pass its thresholds file")
            return ProbePolicy(probe, table, num_layers)
        if self.policy in ("random", "random-uniform"):
            return RandomPolicy(layers, num_layers, uniform=self.policy == "random-uniform")
        if self.policy == "sequential":
            return SequentialPolicy(layers, num_layers)
        raise ConfigError(f"unknown policy {self.policy!r}")


@dataclass
class SamplingParams:
    """Decoding settings. ``temperature == 0`` is greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: set[int] = field(default_factory=set)
    # Per-token log-probabilities: None = off; 0 = the chosen token's only; k in 1..20 = also the top k. They are
    # the log-softmax of the raw (temperature-free) full-vocabulary logits of the layer the token was taken from.
    logprobs: int | None = None

    def validate(self) -> "SamplingParams":
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}", "ask for at least one token")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}", "use 0 for greedy decoding")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}", "use 1.0 to disable nucleus sampling")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ConfigError(f"logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {self.logprobs}",
                              f"ask for at most {MAX_TOP_LOGPROBS} alternatives (0 = the chosen token only)")
        return self
