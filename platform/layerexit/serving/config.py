"""What a Serve application is built from: ``ServeArgs`` (the ``args:`` of a Serve config, fixed per deploy) and
the ``user_config`` (the default exit policy, swapped live through ``reconfigure``).

``serve_configs/*.yaml`` pass ``args`` to ``layerexit.serving.app:build_app``; every key is validated here, so a
typo fails the deploy with the field named instead of being ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from layerexit.config import StrictModel, validate_config
from layerexit.engine.options import ExitConfig
from layerexit.errors import ConfigError


class ServeArgs(StrictModel):
    """The ``args`` of the Serve application (``build_app(args)``)."""

    model: str = Field(
        "smollm2",
        description="Model spec: smollm2 (embedded), a local HF directory, a .gguf file, a hub id, or an MLflow "
        "model URI (models:/name@alias, models:/name/3, runs:/<id>/model).",
    )
    mlflow_tracking_uri: str | None = Field(
        None,
        description="Tracking server for models:/ and runs:/ specs (default: $MLFLOW_TRACKING_URI of the replica, "
        "else the sqlite:///mlflow.db that `build_app` resolves in its working directory).",
    )
    model_name: str | None = Field(
        None, description="Name clients pass as `model` (default: derived from the spec, e.g. the registered name)."
    )
    device: str = Field("auto", description="auto (cuda when available, else cpu), cpu, cuda, cuda:1...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype. auto: bfloat16 on a GPU or a CPU with native bf16 (avx512_bf16/AMX); on "
        "other CPUs float32 when batches form (max_batch_size > 1: compute-bound, bf16 matmuls are emulated there) "
        "and bfloat16 at max_batch_size 1 (memory-bound); the replica logs the choice."
    )
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads per replica (default: what Ray sets from num_cpus)."
    )
    compile: bool = Field(
        False,
        description="Decode steps through torch.compile'd layer segments (inductor on CPU, CUDA graphs on GPU); "
        "compiled on first use, so the first requests of a replica wait for it; eager with a logged reason if "
        "compiling fails.",
    )
    max_batch_size: int = Field(8, ge=1, le=256, description="Most requests one engine batch holds.")
    batch_wait_timeout_s: float = Field(
        0.02, ge=0.0, le=5.0, description="How long the first queued request waits for others to join its batch."
    )
    max_concurrent_batches: int = Field(
        2, ge=1, le=16,
        description="Batches decoded at once, interleaved step by step (new requests start without waiting for "
        "a running batch to finish).",
    )
    continuous_batching: bool = Field(
        True,
        description="New requests join a running batch between decode steps (when it has room) instead of "
        "waiting for a new batch; false = plain dynamic batching.",
    )
    max_prompt_tokens: int = Field(2048, ge=1, description="Longest accepted prompt, in tokens (400 above).")
    max_choices: int = Field(
        8, ge=1, le=64,
        description="Most choices one request may ask for: `n` x the number of prompts in a prompt list (400 above). "
        "Each choice is decoded as its own row.",
    )
    kv_budget_tokens: int | None = Field(
        None, ge=1,
        description="KV-cache budget of a replica, in token positions over all running batches (a row reserves its "
        "prompt + max_tokens, padded to its batch's longest row). Requests that do not fit wait in the queue; one "
        "that could never fit is a 400. Checked at replica start against the device's memory after the weights. "
        "None: no budget (only max_batch_size x max_concurrent_batches bounds the cache).",
    )
    chat_template: Literal["auto", "model", "alpaca"] = Field(
        "auto",
        description="How chat messages become a prompt: `model` = the tokenizer's chat template; `alpaca` = the "
        "Stanford Alpaca template (what the LLaMA-2 LITE configs train with); `auto` = what the training run "
        "recorded (MLflow param data.template), else the tokenizer's template, else Alpaca.",
    )
    max_tokens_limit: int = Field(1024, ge=1, description="Largest accepted `max_tokens` (400 above).")
    default_max_tokens: int = Field(256, ge=1, description="`max_tokens` when a request gives none.")
    default_temperature: float = Field(1.0, ge=0.0, le=2.0, description="`temperature` when a request gives none.")
    request_timeout_s: float = Field(
        300.0, gt=0.0, description="A request still generating after this long is stopped (504 / stream error)."
    )
    api_key_env: str | None = Field(
        None,
        description="Name of an environment variable holding the API key; when set, requests need "
        "`Authorization: Bearer <key>` (401 otherwise). The replica refuses to start if the variable is empty.",
    )
    log_prompts: bool = Field(False, description="Put prompt and completion text into the request logs.")
    user_config: dict[str, Any] | None = Field(
        None,
        description="Default exit config when the deployment has no user_config (the YAML's deployment "
        "user_config wins). Keys of ExitConfig: policy, thresholds, exit_layers, layer, kv, num_draft.",
    )
    deployment_options: dict[str, Any] | None = Field(
        None,
        description="Extra Serve deployment options for programmatic use (max_ongoing_requests, "
        "ray_actor_options...); a config file's `deployments:` section overrides them.",
    )

    @model_validator(mode="after")
    def _consistent(self):
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens_limit ({self.max_tokens_limit})"
            )
        if self.user_config is not None:
            exit_config_from_user_config(self.user_config)
        return self

    def served_name(self) -> str:
        return self.model_name or served_name_for(self.model)

    def dtype_choice(self, device: str | None = None, log: bool = True):
        """``dtype`` resolved for this machine (``layerexit.machine.choose_dtype``): the work is batched decoding
        unless ``max_batch_size`` is 1."""
        from layerexit.machine import choose_dtype

        stage = "decode" if self.max_batch_size == 1 else "batched"
        return choose_dtype(stage, self.dtype, device or self.device, log=log, what="serving")


def served_name_for(spec: str) -> str:
    """The model name clients use, derived from a model spec."""
    if spec.startswith("models:/"):
        rest = spec[len("models:/"):]
        return rest.split("@", 1)[0].split("/", 1)[0]
    if spec.startswith("runs:/"):
        return spec.rstrip("/").rsplit("/", 1)[-1] if spec.count("/") > 2 else spec
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        return path.stem
    if path.is_dir() or spec.startswith((".", "/", "~")):
        return path.resolve().name
    return spec


def parse_serve_args(args: dict[str, Any] | None, source: str = "Serve args") -> ServeArgs:
    """Validate the application args, raising ConfigError that names each bad field."""
    if args is not None and not isinstance(args, dict):
        raise ConfigError(f"{source} must be a mapping, got {type(args).__name__}")
    return validate_config(ServeArgs, dict(args or {}), source)


def exit_config_from_user_config(user_config: dict[str, Any] | None, model_dir: str | Path | None = None) -> ExitConfig:
    """The deployment's default ExitConfig from a ``user_config`` mapping.

    A relative thresholds file path is looked up in the model directory first (a thresholds file shipped with
    an MLflow model), then relative to the working directory. Empty/None means the full model (``final``).
    """
    data = dict(user_config or {})
    if not data:
        return ExitConfig(policy="final")
    thresholds = data.get("thresholds")
    if isinstance(thresholds, str) and model_dir is not None and not Path(thresholds).is_absolute():
        candidate = Path(model_dir) / thresholds
        if candidate.is_file():
            data["thresholds"] = str(candidate)
    if isinstance(data.get("thresholds"), dict):
        data["thresholds"] = {int(k): v for k, v in data["thresholds"].items()}
    return validate_config(ExitConfig, data, "user_config")
