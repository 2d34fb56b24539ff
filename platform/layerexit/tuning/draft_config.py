"""What a draft search is (``tune/*_draft.yaml``): the model, the candidate draft layers and draft lengths, the
prompts acceptance is measured on, the trials, the vLLM confirmation and where the choice is exported.

Loaded with ``load_config(DraftTuneConfig, path, overrides)``; every class forbids unknown keys, so a typo is an
error naming the field. The model, prompt and MLflow sections are the threshold search's own (``tuning.config``).
Checks that need the model (every layer below its depth) happen once its config is read.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from layerexit.config import StrictModel
from layerexit.tuning.config import ModelSettings, PromptSettings, PromptSlice, TuneMlflowSettings

# vLLM's speculative_config accepts at most this many draft tokens in our Serve schema (VllmServeArgs).
MAX_SPECULATIVE_TOKENS = 16


class DraftModelSettings(ModelSettings):
    """The threshold search's model section, plus the depth for checking the layers without the model."""

    num_layers: int | None = Field(
        None, ge=2, description="The model's decoder layers, for checking space.layers where its config.json cannot "
        "be read without fetching it (an MLflow model URI is never downloaded by --check; a hub id not in the cache); "
        "when it can be read, the two must agree.")


class DraftLengthRange(StrictModel):
    """The draft lengths k a draft search covers (every search: exit drafts and EAGLE-3 drafts)."""

    RENAMED: ClassVar[dict[str, str]] = {"num_speculative_tokens": "num_draft"}

    num_draft: tuple[int, int] = Field(
        (1, 6), description="[low, high] of the draft length k (inclusive): the engine's num_draft, the vLLM Serve "
        "config's num_draft (vLLM's num_speculative_tokens).")

    @field_validator("num_draft")
    @classmethod
    def _k_range(cls, value: tuple[int, int]) -> tuple[int, int]:
        lo, hi = value
        if not 1 <= lo <= hi <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"need 1 <= low <= high <= {MAX_SPECULATIVE_TOKENS}, got [{lo}, {hi}]")
        return value

    @property
    def ks(self) -> list[int]:
        lo, hi = self.num_draft
        return list(range(lo, hi + 1))


class DraftSpaceSettings(DraftLengthRange):
    """The (draft layer, num_draft) grid the search covers."""

    layers: list[int] = Field(description="Candidate exit layers (1-based) a draft ends at; each in 1..L-1.")

    @field_validator("layers")
    @classmethod
    def _positive_unique(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("list at least one candidate layer")
        if any(l < 1 for l in value):
            raise ValueError("draft layers are 1-based: every layer must be >= 1")
        if len(set(value)) != len(value):
            raise ValueError("draft layers must be unique")
        return sorted(value)

    @property
    def size(self) -> int:
        return len(self.layers) * len(self.ks)

    def check(self, num_layers: int) -> DraftSpaceSettings:
        """Every layer must be an exit below the final layer of a model with ``num_layers`` layers."""
        from layerexit.errors import ConfigError

        bad = [l for l in self.layers if l >= num_layers]
        if bad:
            raise ConfigError(f"space.layers: {bad} not below the model's {num_layers} layers (a draft must be "
                              "shallower than the model)", f"use layers in 1..{num_layers - 1}")
        return self


class DraftTrialSettings(StrictModel):
    """The Ray Tune trials: one per (layer, k) grid point."""

    measure: Literal["traces", "engine"] = Field(
        "traces", description="traces: the driver records each candidate layer's top-1 along the final layer's "
        "greedy answers once, and a trial replays self-speculative decoding at its (layer, k) on them: the same "
        "counts as decoding with the engine (a layer-l draft of the greedy prefix computes what the trace holds), "
        "in milliseconds. engine: a trial process loads the model and decodes its layer with the engine "
        "(measure_acceptance) once, at the longest k, scoring shorter k from the per-position rates (later trials "
        "of that layer in the process reuse it); for models whose exit adapters a teacher-forced trace might not "
        "reproduce.")
    trial_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves per trial.")
    max_concurrent: int = Field(1, ge=1, description="Trials running at once (engine: each process holds a copy of "
                                "the model).")
    threads: int | None = Field(None, ge=1, description="engine: torch threads in a trial (default: its trial_cpus, "
                                "at least 1).")
    verbose: int = Field(1, ge=0, le=3, description="Ray Tune console verbosity (0 silent).")


# confirm.python: auto
AUTO_PYTHON = "auto"
VLLM_VENV_PYTHON = ".venv-vllm/bin/python"


class VllmConfirmSettings(StrictModel):
    """A real vLLM run of the chosen draft (``layerexit.serving.vllm_check`` in the Python that has vLLM)."""

    vllm: bool = Field(True, description="Confirm the choice with vLLM. true: vLLM must be installed (checked before "
                       "any trial); false: report our engine's figures only.")
    python: str = Field(VLLM_VENV_PYTHON, description="Python that runs vLLM: a path (the CPU `.venv-vllm` of `make "
                        "vllm-env`; relative paths are resolved from the working directory), or auto: the Python "
                        "$LAYEREXIT_VLLM_PYTHON when set (the layerexit-tune image), else the Python running the job when it can import vllm, else "
                        ".venv-vllm/bin/python.")
    prompts: Literal["report", "validation"] = Field(
        "report", description="Which prompts vLLM decodes: the held-out report prompts (our engine measures the "
        "chosen draft on the same ones) or the search's.")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32", description="vLLM dtype (float32: greedy drafting is exact, tokens equal to no draft).")
    max_model_len: int = Field(1024, ge=16, description="vLLM max_model_len.")
    compare: bool = Field(False, description="Also run vLLM without the draft and count identical completions.")
    timeout_s: int = Field(1800, ge=30, description="Wall-clock limit of the vLLM run(s).")
    env: dict[str, str] = Field(
        default_factory=lambda: {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"},
        description="Environment of the vLLM run (e.g. VLLM_CPU_OMP_THREADS_BIND: 0-1 on a 2-core CPU).")

    @field_validator("python")
    @classmethod
    def _python_given(cls, value: str) -> str:
        if not value.strip():
            raise ValueError(f"give a Python path (e.g. {VLLM_VENV_PYTHON}) or {AUTO_PYTHON}")
        return value.strip()


class DraftExportSettings(StrictModel):
    """Where the chosen draft goes."""

    draft_dir: str | None = Field(
        None, description="Directory the chosen draft checkpoint is exported to; `{layer}` is replaced by its layer "
        "(default: <output_dir>/draft-l{layer}). This path is what the Serve config's `draft` gets.")
    serve_config: str | None = Field(
        None, description="A vLLM Serve config (serve_configs/7b.yaml, smollm2_vllm.yaml) whose `draft` and "
        "`num_draft` args are rewritten in place, comments kept (the job's --serve-config wins over this).")
    application: str | None = Field(None, description="Application in the Serve config (default: the one "
                                    "importing layerexit.serving).")
    min_speedup: float = Field(
        1.0, ge=0.0, description="The Serve config is rewritten only if the chosen draft's predicted speedup reaches "
        "this; below it the job exits 3, leaves the config unchanged and still writes the draft and the report.")


class DraftTuneConfig(StrictModel):
    """A draft search (``jobs/tune_draft.py --config tune/<name>_draft.yaml``)."""

    model: DraftModelSettings = Field(default_factory=DraftModelSettings)
    space: DraftSpaceSettings
    trials: DraftTrialSettings = Field(default_factory=DraftTrialSettings)
    prompts: PromptSettings = Field(
        default_factory=lambda: PromptSettings(validation=PromptSlice(split="train", limit=8),
                                               report=PromptSlice(split="heldout", limit=8)),
        description="validation: prompts the search measures acceptance on (training split); report: held-out "
        "prompts the choice is measured on by our engine and by vLLM. max_new_tokens: tokens per prompt; "
        "batch_size: prompts per engine batch while measuring.")
    confirm: VllmConfirmSettings = Field(default_factory=VllmConfirmSettings)
    mlflow: TuneMlflowSettings = Field(default_factory=TuneMlflowSettings)
    export: DraftExportSettings = Field(default_factory=DraftExportSettings)
    output_dir: str = Field("outputs/tune/draft", description="Summary, plots, the draft and Ray results.")
    show_progress: bool = Field(False, description="Progress bars while loading and decoding.")

    @model_validator(mode="after")
    def _confirm_has_prompts(self):
        if self.confirm.vllm and self.confirm.prompts == "report" and self.prompts.report.limit == 0:
            raise ValueError("confirm.prompts is report but prompts.report.limit is 0: give the report prompts or "
                             "set confirm.prompts: validation")
        return self
