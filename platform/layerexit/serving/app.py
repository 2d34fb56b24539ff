"""The Serve application builder.

    serve run serve_configs/smollm2.yaml                   # a config file (import_path: ...:build_app, args: ...)
    serve run layerexit.serving.app:app                     # defaults; LAYEREXIT_SERVE_* env vars override
    serve run layerexit.serving.app:build_app model=/path/to/hf_dir device=cpu

``build_app(args)`` validates the args (``ServeArgs``; unknown keys are errors) and binds them to the
``EarlyExitLLM`` deployment; nothing is loaded until a replica starts. Deployment options (replicas,
autoscaling, ``ray_actor_options``, ``user_config``) come from the config file's ``deployments:`` section.
"""

from __future__ import annotations

import os
from typing import Any

from ray.serve import Application

from layerexit.config import coerce_cli_args
from layerexit.serving.config import ServeArgs, parse_serve_args
from layerexit.serving.deployment import EarlyExitLLM
from layerexit.serving.kv_budget import precheck_kv_budget
from layerexit.serving.model_source import is_mlflow_uri
from layerexit.tracking import resolve_tracking_uri

ENV_PREFIX = "LAYEREXIT_SERVE_"


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The OpenAI-compatible early-exit application for ``args`` (see ``ServeArgs``)."""
    cfg: ServeArgs = parse_serve_args(_coerce_cli_args(args or {}))
    if is_mlflow_uri(cfg.model) and cfg.mlflow_tracking_uri is None and not os.environ.get("MLFLOW_TRACKING_URI"):
        # Replicas may run in another working directory: pin the default sqlite store to this one.
        cfg = cfg.model_copy(update={"mlflow_tracking_uri": resolve_tracking_uri(None)})
    options: dict[str, Any] = dict(cfg.deployment_options or {})
    if cfg.user_config is not None:
        options.setdefault("user_config", cfg.user_config)
    ongoing = options.get("max_ongoing_requests")
    if ongoing is not None and ongoing < cfg.max_batch_size:
        from layerexit.errors import ConfigError

        raise ConfigError(f"max_ongoing_requests ({ongoing}) is below max_batch_size ({cfg.max_batch_size})",
                          "raise max_ongoing_requests so a replica can hold a full batch")
    # A KV budget the device cannot hold fails here, before any replica starts, when this machine can tell.
    precheck_kv_budget(cfg.model, cfg.device, cfg.dtype_choice(log=False).dtype, cfg.kv_budget_tokens)
    deployment = EarlyExitLLM.options(**options) if options else EarlyExitLLM
    return deployment.bind(cfg.model_dump(mode="json"))


def _coerce_cli_args(args: dict[str, Any]) -> dict[str, Any]:
    """``serve run module:build_app key=value`` passes strings: parse JSON-looking values (numbers, objects)."""
    return coerce_cli_args(args, ("model", "model_name", "device", "dtype", "api_key_env", "mlflow_tracking_uri"))


def args_from_env(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """``LAYEREXIT_SERVE_MODEL=...``-style variables as args (values parsed like CLI args)."""
    environ = os.environ if environ is None else environ
    fields = set(ServeArgs.model_fields)
    return {key[len(ENV_PREFIX):].lower(): value for key, value in environ.items()
            if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX):].lower() in fields}


# `serve run layerexit.serving.app:app`: the embedded SmolLM2 on CPU unless LAYEREXIT_SERVE_* say otherwise.
app = build_app(args_from_env())
