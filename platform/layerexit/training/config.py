"""The training job's config (``jobs/configs/*.yaml``) and its validation, all done before any worker starts.

``load_train_config(path, overrides)`` = YAML + ``key=value`` overrides -> ``TrainConfig`` -> checks against the
model (exit layers within its depth) and the data (path exists) -> the same config, or a one-line ``ConfigError``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from layerexit.config import LiteLossConfig, StrictModel, load_config
from layerexit.errors import ConfigError, LayerexitError


class ModelSection(StrictModel):
    """Which model to fine-tune."""

    spec: str = Field(..., description="smollm2, a local Hugging Face directory, a .gguf file, a hub id, or an MLflow "
                      "model URI (models:/name@alias: e.g. a LITE model as the frozen base of recipe adapters).")
    num_layers: int | None = Field(
        None, ge=1,
        description="Expected decoder depth. Used to check exit layers when the model's config cannot be read "
        "offline (hub ids not yet downloaded; MLflow model URIs, which are not downloaded to validate the config: "
        "the registry holds the whole model); when it can be read, the two must agree.",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute decoder activations in backward (saves memory).")


class DataSection(StrictModel):
    """Training data. ``instructions``: the built-in instruction set with the base model's own greedy answers
    (self-distillation, offline); ``alpaca``/``chat``: a hub id or a local JSON/JSONL file."""

    source: Literal["instructions", "alpaca", "chat"] = Field("instructions", description="Kind of dataset.")
    path: str | None = Field(
        None, description="alpaca/chat: hub id (tatsu-lab/alpaca) or local .json/.jsonl; instructions: optional "
        "instruction JSONL replacing the built-in set.",
    )
    template: Literal["chat", "alpaca"] = Field("chat", description="Prompt template: the model's chat template or Alpaca's.")
    max_length: int = Field(512, ge=8, description="Sequences are truncated to this many tokens.")
    eval_fraction: float = Field(
        0.05, gt=0.0, lt=1.0,
        description="alpaca/chat: share of records held out for evaluation (instructions: fixed 20% by id).",
    )
    max_train_examples: int | None = Field(None, ge=1, description="Use at most this many training examples.")
    max_eval_examples: int | None = Field(64, ge=1, description="Use at most this many held-out examples for eval loss.")
    distill_max_new_tokens: int = Field(64, ge=1, description="instructions: length of the self-distilled answers.")
    distill_batch_size: int = Field(8, ge=1, description="instructions: prompts per generate() batch.")
    seed: int = Field(0, description="Seed for the held-out split of alpaca/chat data.")
    samples_per_instruction: int = Field(
        0, ge=0, description="instructions: extra answers sampled from the base model per TRAINING instruction "
        "(temperature > 0), added to the greedy one; cached. Held-out instructions are never sampled.")
    sample_temperature: float = Field(0.8, gt=0.0, description="Sampling temperature of those extra answers.")
    sample_top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus (top-p) of those extra answers.")
    group_by_length: bool = Field(
        True, description="Length-grouped batching: each epoch's shuffled order is cut into windows of "
        "length_group_size examples, each sorted longest first, so a global batch holds similar lengths (less "
        "padding; every rank still pads micro-step b to one width). The order does not depend on the cluster size.")
    length_group_size: int = Field(256, ge=2, description="Examples per length-sorting window (group_by_length).")
    magpie_prompts: int = Field(
        0, ge=0, description="instructions: add this many Magpie-style conversations: requests the chat model writes "
        "itself after its template's user header, with its greedy answers (cached; layerexit.data.magpie).")
    text_tokens: int = Field(
        0, ge=0, description="Add up to this many tokens of plain text that ships with the installed packages (their "
        "READMEs and the Python docs' topics; layerexit.data.text_corpus), every position trained on; labelled by the "
        "teacher's one forward pass (recipes with a teacher cache).")

    @model_validator(mode="after")
    def _path_needed(self) -> DataSection:
        if self.source in ("alpaca", "chat") and not self.path:
            raise ValueError(f"data.path is required for source={self.source!r} (a hub id or a local .json/.jsonl)")
        return self


class LiteSection(LiteLossConfig):
    """LITE loss settings plus an optional anchor that keeps the final layer close to the original model."""

    anchor_weight: float = Field(
        0.0, ge=0.0,
        description="Weight of KL(original model's final layer || current final layer) on response tokens, "
        "computed with a frozen copy of the starting model; 0 disables it (and the copy).",
    )


class DistillSection(StrictModel):
    """Teacher = the frozen base model's final layer, stored as top-k ids + log-probs (the teacher cache).
    Used by ``recipe: distill`` (full fine-tuning) and ``recipe: adapters`` (frozen base, exit adapters)."""

    top_k: int = Field(64, ge=1, description="Teacher tokens kept per position (<= the vocabulary size).")
    temperature: float = Field(1.0, description="Softmax temperature of teacher and student (> 0).")
    full_every: int = Field(
        8, ge=0, description="Every n-th position also runs the full LM head, which scores the mass outside the "
        "teacher's top-k (keeps confidence calibrated); 1 = everywhere (exact), 0 = never (top-k only).")
    anchor_weight: float = Field(1.0, ge=0.0, description="recipe distill: weight of the same KL at the final layer "
                                                          "towards the base model (keeps the final layer).")
    chunk_size: int | None = Field(256, ge=1, description="Positions per LM-head chunk (activation checkpointed).")
    cache_dir: str | None = Field(None, description="Teacher cache directory (default: $LAYEREXIT_HOME/teacher_cache/"
                                                    "<fingerprint>); one built for other model/data/k is an error.")
    cache_precision: Literal["auto", "fp32", "autocast_bf16"] = Field(
        "auto", description="Precision of the teacher's forward pass (a batched prefill). auto: bf16 autocast "
        "where the CPU has native bf16 (avx512_bf16/AMX), fp32 on other CPUs (layerexit.machine.choose_dtype).")
    cache_tasks: int = Field(2, ge=1, description="Ray tasks that build the cache (one CPU each).")
    cache_gpus: float = Field(0.0, ge=0.0, le=8.0, description="GPUs each cache task asks Ray for (0: CPU tasks). > 0: "
                              "the teacher runs on the GPU in bf16 (a 7B teacher over 2,000 examples: minutes, against "
                              "hours on CPU cores); cache_precision is then not used.")

    @field_validator("temperature")
    @classmethod
    def _positive(cls, value: float) -> float:
        if not value > 0:
            raise ValueError("must be > 0 (1.0 uses the teacher as is)")
        return value


class AdapterSection(StrictModel):
    """``recipe: adapters``: one adapter per exit with every base weight frozen. ``kind: mlp``: an RMSNorm +
    low-rank residual SiLU MLP (zero-initialised output), trained on cached exit hidden states (single positions).
    ``kind: decoder_layer``: standard decoder layers of the model's own class that attend over the exit's past
    (Kangaroo's adapter; exportable as a plain draft checkpoint), trained on whole sequences: the frozen layers
    1..l run without gradients on each batch (cheap for the shallow exits drafts use) and the adapter learns the
    teacher cache's top-k at every response position."""

    kind: Literal["mlp", "decoder_layer"] = Field("mlp", description="Adapter shape (see the section's docstring).")
    rank: int = Field(256, ge=1, description="kind mlp: bottleneck width of each adapter.")
    positions_per_batch: int = Field(512, ge=1, description="kind mlp: cached positions per worker micro-batch.")
    num_layers: int = Field(1, ge=1, le=4, description="kind decoder_layer: decoder layers per adapter.")
    init: Literal["next_layers", "zero_residual"] = Field(
        "zero_residual", description="kind decoder_layer: copies of the model's layers l+1.. (next_layers), or those "
        "copies with the attention and MLP output projections zeroed so the adapter starts as the identity "
        "(zero_residual).")


class DraftSection(StrictModel):
    """After training, pick the exit that drafts best for lossless self-speculation and ship it with the model:
    acceptance at every draft position is measured with the engine on held-out prompts at each exit layer up to
    ``max_layer``, priced by weight bytes (``tuning.draft_choice``), and the best (layer, draft length) is written
    into the registered model's ``draft_settings.json`` (with its draft vocabulary), so ``{"policy":
    "self-speculative"}`` on it drafts as chosen."""

    choose: bool = Field(False, description="Measure and ship draft settings after training.")
    max_layer: int = Field(10, ge=1, description="Deepest exit layer a draft may end at.")
    max_draft: int = Field(6, ge=1, le=16, description="Longest draft measured (the choice is 1..max_draft).")
    prompts: int = Field(8, ge=1, description="Held-out evaluation prompts the acceptance is measured on.")
    max_new_tokens: int = Field(48, ge=4, description="Tokens generated per prompt while measuring.")
    vocab_size: int | None = Field(
        None, ge=1, description="Static draft vocabulary: the N tokens the training split's answers use most "
        "(FR-Spec); the draft head scores only those, verification keeps the full head. None: full vocabulary.")


class Eagle3Section(StrictModel):
    """``recipe: eagle3``: an EAGLE-3 feature draft (one decoder layer over the target's hidden states at
    ``aux_layers`` of the previous position + the next token's embedding, and a pruned head), trained on the frozen
    base's cached features and top-k distribution (teacher cache over every position) with training-time test:
    the draft is unrolled ``ttt_steps`` times on its own outputs, each step scored by soft cross-entropy against the
    teacher's top-k restricted to the draft vocabulary, weighted ``step_decay ** j``. Shipped as ``eagle3/`` (vLLM's
    EAGLE-3 layout) + ``draft_settings.json`` in the registered model, the draft length chosen from measured
    held-out acceptance."""

    aux_layers: list[int] | None = Field(
        None, description="Target layers the draft reads (residual stream after a layers, 1..N-1); default vLLM's "
        "(2, N/2, N-3).")
    ttt_steps: int = Field(4, ge=1, le=8, description="Training-time-test steps (draft positions trained).")
    step_decay: float = Field(0.8, gt=0.0, le=1.0, description="Weight of step j is step_decay ** j.")
    vocab_size: int = Field(8192, ge=1, description="Draft vocabulary: the N tokens the model itself produces most "
                                                    "(its answers on the training split); <= the model's vocabulary.")
    max_draft: int = Field(5, ge=1, le=8, description="Draft lengths measured on held-out prompts (1..max_draft); "
                                                      "the shipped num_draft maximises tau(k) / (1 + k c).")
    eval_prompts: int = Field(16, ge=1, description="Held-out answers the acceptance is measured on while training.")
    final_eval_prompts: int = Field(48, ge=1, description="Held-out answers the shipped draft length is chosen on.")


class OptimSection(StrictModel):
    """AdamW with linear warmup and a cosine (or constant/linear) decay, per optimizer step."""

    lr: float = Field(2e-5, gt=0.0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay (not applied to norms and biases).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Warmup as a share of total steps (if larger).")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Final learning rate as a share of lr.")
    grad_clip: float = Field(1.0, ge=0.0, description="Gradient norm clip (0 disables).")
    micro_batch_size: int = Field(4, ge=1, description="Sequences per worker per forward pass.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    global_batch_size: int | None = Field(
        None, ge=1, description="Optional check: must equal micro_batch_size * grad_accum * scaling.num_workers.")
    epochs: int = Field(1, ge=1, description="Passes over the training data.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (caps epochs).")
    max_minutes: float | None = Field(
        None, gt=0.0, description="Wall-clock budget of the whole job from its start (data preparation included): "
        "the step that ends after it, less a reserve for the final evaluation and registration, is the last one "
        "(evaluated, checkpointed, registered as usual; the learning-rate schedule stays planned for the step "
        "count). For shared machines whose load moves step times several-fold.")
    seed: int = Field(0, description="Seed for data order and initialisation of randomness.")


class DeepSpeedSection(StrictModel):
    """DeepSpeed engine settings."""

    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage: 1 optimizer, 2 +gradients, 3 +parameters.")
    precision: Literal["auto", "fp32", "bf16", "autocast_bf16"] = Field(
        "auto",
        description="auto: bf16 on GPU; on CPU autocast_bf16 where the CPU has native bf16 (avx512_bf16/AMX), else "
        "fp32 (bf16 matmuls are emulated there, ~30x slower); decided on each worker and logged. bf16: DeepSpeed "
        "bf16 weights with fp32 optimizer state. autocast_bf16: fp32 weights, torch.autocast bf16 compute.",
    )
    offload_optimizer: bool = Field(False, description="ZeRO-Offload optimizer state to CPU (GPU runs only).")
    extra: dict[str, Any] = Field(default_factory=dict, description="Raw DeepSpeed config entries merged last.")

    @model_validator(mode="after")
    def _consistent(self) -> DeepSpeedSection:
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs ZeRO: set deepspeed.zero_stage to 1, 2 or 3")
        # Entries the job derives from other fields: setting them in `extra` would silently contradict those.
        owned = {"train_batch_size": "optim.micro_batch_size/grad_accum", "train_micro_batch_size_per_gpu":
                 "optim.micro_batch_size", "gradient_accumulation_steps": "optim.grad_accum",
                 "gradient_clipping": "optim.grad_clip", "bf16": "deepspeed.precision", "fp16": "deepspeed.precision",
                 "optimizer": "optim.* (the job builds AdamW itself)", "scheduler": "optim.schedule/warmup_*"}
        zero_owned = {"stage": "deepspeed.zero_stage", "offload_optimizer": "deepspeed.offload_optimizer"}
        for key, field in owned.items():
            if key in self.extra:
                raise ValueError(f"deepspeed.extra.{key} is set by the job from {field}; set it there instead")
        zero = self.extra.get("zero_optimization") or {}
        if not isinstance(zero, dict):
            raise ValueError("deepspeed.extra.zero_optimization must be a mapping of ZeRO options")
        for key, field in zero_owned.items():
            if key in zero:
                raise ValueError(f"deepspeed.extra.zero_optimization.{key} is set by the job from {field}; "
                                 "set it there instead")
        if zero.get("offload_param") and self.zero_stage != 3:
            raise ValueError("deepspeed.extra.zero_optimization.offload_param needs deepspeed.zero_stage=3")
        return self


class ScalingSection(StrictModel):
    """Ray Train ScalingConfig."""

    num_workers: int = Field(2, ge=1, description="Training workers (one per GPU on GPU clusters).")
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL; otherwise CPU workers and gloo.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker (also its torch thread count).")


class CheckpointSection(StrictModel):
    """Where checkpoints go and how failures are handled."""

    storage_path: str = Field("~/ray_results/layerexit",
                              description="Ray Train storage; the same name + storage resumes from the latest checkpoint.")
    every_steps: int | None = Field(None, ge=1, description="Checkpoint every N optimizer steps (always at the end).")
    num_to_keep: int | None = Field(2, ge=1, description="Keep only the newest N checkpoints (null keeps all).")
    max_failures: int = Field(2, ge=-1, description="Restart from the latest checkpoint after this many worker failures.")

    @field_validator("storage_path")
    @classmethod
    def _local_path(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("is empty; give a directory, e.g. /mnt/shared/ray-results")
        if "://" in value:
            raise ValueError(f"{value} is a URI; this job reads and writes checkpoints as files, so give a directory "
                             "every node mounts at the same path (e.g. /mnt/shared/ray-results on an NFS/EFS volume)")
        return value


class MlflowSection(StrictModel):
    """MLflow tracking (rank 0 logs). Tracking URI: this value, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    in the driver's working directory."""

    tracking_uri: str | None = Field(None, description="MLflow tracking URI.")

    @field_validator("tracking_uri")
    @classmethod
    def _known_scheme(cls, value: str | None) -> str | None:
        from layerexit.errors import ConfigError
        from layerexit.tracking import check_tracking_uri

        try:
            check_tracking_uri(value, "tracking_uri")
        except ConfigError as err:
            raise ValueError(str(err).removeprefix("tracking_uri: ")) from None
        return value
    experiment: str = Field("layerexit-train", description="Experiment name.")
    register_model: bool = Field(True, description="Log the final model and register it as layerexit-<name>.")
    registered_name: str | None = Field(None, description="Registered model name (default layerexit-<name>).")
    alias: str = Field("trained", description="Alias set on the new version ('latest' is reserved by MLflow; "
                                              "models:/<name>/latest always means the newest version).")
    log_system_metrics: bool = Field(True, description="CPU/GPU/memory metrics of the driver's node.")
    log_every_steps: int = Field(1, ge=1, description="Training metrics every N optimizer steps.")

    @field_validator("alias")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value.lower() == "latest" or (value[:1] in "vV" and value[1:].isdigit()):
            raise ValueError("'latest' and 'v<N>' are reserved alias names in MLflow; choose another (e.g. trained)")
        return value


class EvalSection(StrictModel):
    """Held-out evaluation: loss at every exit and alignment of every exit with the final layer (paper Fig. 5)."""

    every_steps: int | None = Field(None, ge=1, description="Evaluate every N optimizer steps (always at the end).")
    at_start: bool = Field(True, description="Evaluate before the first step (the 'before' point).")
    alignment_prompts: int = Field(20, ge=0, description="Held-out prompts for alignment (0 disables alignment).")
    alignment_max_new_tokens: int = Field(48, ge=1, description="Tokens generated per alignment prompt.")
    layers: list[int] | None = Field(None, description="Layers to report eval loss/alignment for "
                                                       "(default: lite.exit_layers plus the final layer).")


class TrainConfig(StrictModel):
    """A LITE fine-tuning job."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                      description="Run name: Ray Train run directory and MLflow run/registered model name.")
    model: ModelSection
    recipe: Literal["lite", "distill", "adapters", "eagle3"] = Field(
        "lite", description="lite: the paper's CE-LITE (full fine-tuning, labels); distill: full fine-tuning towards "
        "the base model's top-k distribution at every exit plus a final-layer anchor; adapters: frozen base, one "
        "small adapter per exit trained by distillation (final layer = base model exactly); eagle3: frozen base, an "
        "EAGLE-3 feature draft over its aux layers (section eagle3) for lossless speculative decoding.")
    data: DataSection = Field(default_factory=DataSection)
    lite: LiteSection = Field(default_factory=LiteSection)
    distill: DistillSection = Field(default_factory=DistillSection)
    adapters: AdapterSection = Field(default_factory=AdapterSection)
    eagle3: Eagle3Section = Field(default_factory=Eagle3Section)
    optim: OptimSection = Field(default_factory=OptimSection)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    mlflow: MlflowSection = Field(default_factory=MlflowSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    draft: DraftSection = Field(default_factory=DraftSection)

    @model_validator(mode="after")
    def _batch_sizes(self) -> TrainConfig:
        per_step = self.optim.micro_batch_size * self.optim.grad_accum * self.scaling.num_workers
        if self.optim.global_batch_size is not None and self.optim.global_batch_size != per_step:
            raise ValueError(
                f"optim.global_batch_size={self.optim.global_batch_size} but DeepSpeed needs train_batch_size = "
                f"micro_batch_size ({self.optim.micro_batch_size}) * grad_accum ({self.optim.grad_accum}) * "
                f"scaling.num_workers ({self.scaling.num_workers}) = {per_step}"
            )
        if self.recipe == "distill" and self.deepspeed.zero_stage == 3:
            raise ValueError("recipe=distill scores exits on gathered LM-head rows and is not supported with "
                             "deepspeed.zero_stage=3; use zero_stage 2 (or recipe=adapters, whose base is frozen)")
        if self.recipe not in ("lite", "eagle3") and not self.lite.exit_layers:
            raise ValueError(f"recipe={self.recipe} needs lite.exit_layers (the exits to train)")
        if self.recipe == "eagle3" and self.deepspeed.zero_stage == 3:
            raise ValueError("recipe=eagle3 trains a small draft over a frozen base that every rank needs whole (its "
                             "embedding and head initialise and feed the draft): use deepspeed.zero_stage 2")
        if self.recipe == "eagle3" and self.draft.choose:
            raise ValueError("draft.choose picks an exit draft; recipe=eagle3 ships its feature draft and chooses its "
                             "length itself (eagle3.max_draft): set draft.choose=false")
        if self.deepspeed.offload_optimizer and not self.scaling.use_gpu:
            raise ValueError("deepspeed.offload_optimizer needs scaling.use_gpu=true (the optimizer is on CPU already)")
        return self

    # ----------------------------------------------------------------------------------- derived values

    @property
    def train_batch_size(self) -> int:
        """Sequences per optimizer step across all workers (DeepSpeed's train_batch_size)."""
        return self.optim.micro_batch_size * self.optim.grad_accum * self.scaling.num_workers

    @property
    def registered_model_name(self) -> str:
        return self.mlflow.registered_name or f"layerexit-{self.name}"

    @property
    def precision(self) -> str:
        """Resolved precision: fp32 | bf16 | autocast_bf16 (``auto`` per ``layerexit.machine.training_precision`` on
        the machine evaluating it; not logged here: ``resolve_precision`` logs)."""
        from layerexit.machine import training_precision

        return training_precision(self.deepspeed.precision, self.scaling.use_gpu, log=False)

    def resolve_precision(self) -> str:
        """``precision``, with the choice logged (``logger.info``) when it was ``auto``."""
        from layerexit.machine import training_precision

        return training_precision(self.deepspeed.precision, self.scaling.use_gpu)

    def storage_dir(self) -> Path:
        return Path(os.path.expanduser(self.checkpoint.storage_path)).resolve()

    def flat_params(self) -> dict[str, str]:
        """Every setting as ``section.key -> str`` (for MLflow params)."""
        out: dict[str, str] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = str(value)

        walk("", self.model_dump(mode="json"))
        return out


# --------------------------------------------------------------------------------------- validation at load


def model_depth(cfg: TrainConfig) -> int:
    """The model's number of decoder layers, read from its config (cache only for hub ids), else num_layers.

    An MLflow model URI with ``num_layers`` set is not downloaded here (validating a config must not fetch a
    7B model, and ``--check`` runs offline): its depth is ``num_layers``, checked again when the job loads it."""
    from layerexit.models.loading import resolve_model
    from layerexit.models.mlflow_source import is_mlflow_uri

    spec = cfg.model.spec
    if is_mlflow_uri(spec) and cfg.model.num_layers is not None:
        return int(cfg.model.num_layers)
    depth = None
    try:
        resolved = resolve_model(spec)
    except LayerexitError as err:
        if is_mlflow_uri(spec):
            fix = "set num_layers to validate without MLflow"
            raise ConfigError(f"model: {err.problem}", f"{err.fix}, or {fix}" if err.fix else fix) from None
        raise ConfigError(f"model: {err}") from None
    config_file: str | None = None
    if resolved.source == "hub":
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(resolved.location, "config.json")
            config_file = found if isinstance(found, str) else None
        except Exception:  # noqa: BLE001 - no cache, no problem: fall back to num_layers
            config_file = None
    else:
        config_file = str(Path(resolved.location) / "config.json")
    if config_file and Path(config_file).is_file():
        import json

        data = json.loads(Path(config_file).read_text())
        data = data.get("text_config", data)
        depth = data.get("num_hidden_layers") or data.get("n_layer") or data.get("num_layers")
    if depth is not None and cfg.model.num_layers is not None and depth != cfg.model.num_layers:
        raise ConfigError(f"num_layers={cfg.model.num_layers} but {spec} has {depth} layers",
                          "fix num_layers or remove it")
    depth = depth or cfg.model.num_layers
    if depth is None:
        raise ConfigError(f"model: cannot read the depth of {spec!r} offline",
                          "download the model first or set num_layers")
    return int(depth)


def check_registered_depth(cfg: TrainConfig, depth: int) -> int:
    """When the job starts: an MLflow model URI that validation took ``num_layers`` for is downloaded (the job
    needs it next) and its real depth must equal that; other specs were read already. Returns the depth."""
    from layerexit.models.mlflow_source import is_mlflow_uri

    if not is_mlflow_uri(cfg.model.spec) or cfg.model.num_layers is None:
        return depth
    actual = model_depth(cfg.model_copy(update={"model": cfg.model.model_copy(update={"num_layers": None})}))
    if actual != depth:
        raise ConfigError(f"num_layers={depth} but {cfg.model.spec} has {actual} layers",
                          "fix num_layers or remove it")
    return actual


def validate_against_model(cfg: TrainConfig, depth: int) -> None:
    from layerexit.losses import exit_weights

    bad = [l for l in cfg.lite.exit_layers if not 1 <= l < depth]
    if bad:
        raise ConfigError(f"lite.exit_layers: {bad} are beyond the model's intermediate layers 1..{depth - 1}",
                          f"{cfg.model.spec} has {depth} layers and the final layer {depth} is always included")
    try:
        exit_weights(cfg.lite.exit_layers, depth, cfg.lite.weights)
    except ConfigError as err:
        raise ConfigError(f"lite.weights: {err}") from None
    if cfg.draft.choose and not any(l <= cfg.draft.max_layer for l in cfg.lite.exit_layers):
        raise ConfigError(f"draft.max_layer={cfg.draft.max_layer}: no exit layer in lite.exit_layers "
                          f"{cfg.lite.exit_layers} is that shallow", "add a shallow exit or raise draft.max_layer")
    if cfg.recipe == "adapters" and cfg.adapters.kind == "decoder_layer":
        deepest = max(cfg.lite.exit_layers) + cfg.adapters.num_layers
        if deepest > depth:
            raise ConfigError(f"adapters.num_layers={cfg.adapters.num_layers}: the adapter of exit "
                              f"{max(cfg.lite.exit_layers)} would copy layers up to {deepest}, the model has {depth}",
                              "lower adapters.num_layers or the deepest exit layer")
    if cfg.recipe == "eagle3":
        from layerexit.models.eagle3 import default_aux_layers

        aux = cfg.eagle3.aux_layers if cfg.eagle3.aux_layers is not None else list(default_aux_layers(depth))
        bad = [a for a in aux if not 1 <= a <= depth - 1]
        if not aux or bad:
            raise ConfigError(f"eagle3.aux_layers: {bad or aux} out of range for a {depth}-layer model",
                              f"use layer ids in 1..{depth - 1} (vLLM's default: {list(default_aux_layers(depth))})")
    if cfg.eval.layers is not None:
        bad = [l for l in cfg.eval.layers if not 1 <= l <= depth]
        if bad:
            raise ConfigError(f"eval.layers: {bad} do not exist (the model has layers 1..{depth})")


def model_vocab_size(cfg: TrainConfig) -> int | None:
    """The model's vocabulary size from its config.json (None when it cannot be read offline; MLflow model URIs are
    not downloaded for it)."""
    import json

    from layerexit.models.loading import resolve_model
    from layerexit.models.mlflow_source import is_mlflow_uri

    if is_mlflow_uri(cfg.model.spec):
        return None
    try:
        location = resolve_model(cfg.model.spec).location
    except LayerexitError:
        return None
    path = Path(location) / "config.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data.get("text_config", data).get("vocab_size")


def validate_recipe(cfg: TrainConfig) -> None:
    """distill/adapters settings that need the model: k within the vocabulary, a named cache that exists."""
    if cfg.recipe == "lite":
        return
    vocab = model_vocab_size(cfg)
    if vocab is not None and cfg.draft.vocab_size is not None and cfg.draft.vocab_size > vocab:
        raise ConfigError(f"draft.vocab_size={cfg.draft.vocab_size} is larger than the vocabulary ({vocab})",
                          f"choose N in 1..{vocab} or leave it unset for the full head")
    if vocab is not None and cfg.recipe == "eagle3" and cfg.eagle3.vocab_size > vocab:
        raise ConfigError(f"eagle3.vocab_size={cfg.eagle3.vocab_size} is larger than the model's vocabulary ({vocab})",
                          f"choose N in 1..{vocab} (the draft head's rows), e.g. 8192")
    if vocab is not None and cfg.distill.top_k > vocab:
        raise ConfigError(f"distill.top_k={cfg.distill.top_k} is larger than the vocabulary ({vocab})",
                          f"choose a k between 1 and {vocab}, e.g. 64")
    if cfg.distill.cache_dir:
        from layerexit.data.teacher_cache import META

        path = Path(cfg.distill.cache_dir).expanduser()
        if path.exists() and any(path.iterdir()) and not (path / META).is_file():
            raise ConfigError(f"distill.cache_dir: {path} holds no complete teacher cache (half written?)",
                              "delete it or choose an empty directory; the job rebuilds it")


def validate_data(cfg: TrainConfig) -> None:
    from layerexit.data.datasets import check_data_path

    if cfg.data.path is None:
        return
    try:
        if cfg.data.source == "instructions":
            if not Path(cfg.data.path).expanduser().is_file():
                raise LayerexitError(f"instruction file not found: {cfg.data.path}")
        else:
            check_data_path(cfg.data.path)
            if Path(cfg.data.path).expanduser().exists():  # local data: check its columns now, not in a worker
                from layerexit.data.datasets import detect_format, load_records, validate_records

                records = load_records(cfg.data.path)
                fmt = detect_format(records, cfg.data.path)
                if cfg.data.source != fmt:
                    raise LayerexitError(f"{cfg.data.path} holds {fmt} records but data.source is {cfg.data.source!r}",
                                         f"set data.source={fmt}")
                validate_records(records, fmt, cfg.data.path)
    except LayerexitError as err:
        raise ConfigError(f"data.path: {err}") from None


def validate_train_config(cfg: TrainConfig) -> int:
    """Every check that needs the model or the filesystem; returns the model depth."""
    validate_data(cfg)
    depth = model_depth(cfg)
    validate_against_model(cfg, depth)
    validate_recipe(cfg)
    return depth


def load_train_config(path: str | Path, overrides: list[str] | None = None, check: bool = True) -> TrainConfig:
    """Load and validate a training config (``check=False`` skips the model/data checks)."""
    cfg = load_config(TrainConfig, path, overrides)
    if check:
        validate_train_config(cfg)
    return cfg
