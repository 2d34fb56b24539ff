"""The Ray Serve deployment: one early-exit model per replica behind an OpenAI-compatible FastAPI ingress.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (streaming or not),
``GET /v1/early_exit`` (the replica's default exit config and batching counters), ``GET /health``.

- The model loads once per replica (``__init__``); ``reconfigure(user_config)`` swaps the default exit policy
  and thresholds live; ``check_health`` fails when the engine worker died or stalled.
- Generation runs on the ``BatchScheduler`` worker thread (dynamic batching, see ``scheduler.py``); a request
  whose client disconnects, times out or hits a stop string is cancelled and stops using the engine.
- A request's choices (``n`` x its prompt list) are decoded as separate rows (``choices.py``); ``logprobs`` come
  from each token's exit layer, ``echo`` prompt log-probs from a full-depth prefill (``engine/scoring.py``).
- Every bad input is a 4xx with an OpenAI error object; unexpected failures are a 500 with the same shape.
- Metrics go through ``ray.serve.metrics`` (Prometheus, Ray's metrics export port); one JSON log line per
  request, without prompt or completion text unless ``log_prompts`` is set.
"""

# No `from __future__ import annotations`: Serve's class-based FastAPI views need real annotations (Request).

import asyncio
import contextlib
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from layerexit.engine.options import ExitConfig, SamplingParams
from layerexit.errors import LayerexitError
from layerexit.engine.scoring import score_prompt
from layerexit.serving.chat_format import ChatFormatError, chat_prompt_ids, choose_chat_format, training_template
from layerexit.serving.choices import (
    LOGPROBS_FROM_ECHO,
    LOGPROBS_FROM_EXIT,
    ChoicePlan,
    Outcome,
    collect,
    generate_choice,
    merge,
    plan_choices,
)
from layerexit.serving.config import ServeArgs, exit_config_from_user_config
from layerexit.serving.kv_budget import check_kv_budget, device_memory_bytes, kv_bytes_per_token
from layerexit.serving.logprobs import TokenScores, chat_logprobs, completion_logprobs
from layerexit.serving.protocol import (
    SSE_DONE,
    APIError,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatResponseMessage,
    ChunkExit,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionRequest,
    CompletionResponse,
    ExitStatsAccumulator,
    ModelCard,
    ModelList,
    Usage,
    config_error_to_api_error,
    exit_config_key,
    merge_exit_config,
    new_id,
    now,
    sse,
    validation_error_to_api_error,
)
from layerexit.serving.scheduler import BatchScheduler, SchedulerError

logger = logging.getLogger("ray.serve")

api = FastAPI(title="layerexit", description="Early-exit LLaMA-family models behind an OpenAI-compatible API.")


def _error_response(err: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


@api.exception_handler(APIError)
async def _api_error(_request: Request, err: APIError) -> JSONResponse:
    return _error_response(err)


@api.exception_handler(RequestValidationError)
async def _request_validation(_request: Request, err: RequestValidationError) -> JSONResponse:
    return _error_response(validation_error_to_api_error(err.errors()))


@api.exception_handler(StarletteHTTPException)
async def _http_error(_request: Request, err: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
    return _error_response(APIError(err.status_code, str(err.detail), code=code))


class _Metrics:
    """Prometheus metrics through Ray Serve (exported with ``ray_`` prefix and replica/deployment tags)."""

    def __init__(self, num_layers: int, model: str) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        latency = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
        self.requests = Counter("layerexit_requests", "Requests by route and HTTP status.",
                                tag_keys=("model", "route", "status"))
        self.prompt_tokens = Counter("layerexit_prompt_tokens", "Prompt tokens processed.", tag_keys=("model",))
        self.completion_tokens = Counter("layerexit_completion_tokens", "Tokens generated.",
                                         tag_keys=("model", "policy"))
        self.exit_layer = Histogram("layerexit_exit_layer", "Exit layer of each generated token.",
                                    boundaries=[float(layer) for layer in range(1, num_layers + 1)],
                                    tag_keys=("model", "policy"))
        self.flops_spent = Counter("layerexit_flops_spent", "Decode FLOPs spent.", tag_keys=("model", "policy"))
        self.flops_full = Counter("layerexit_flops_full", "Decode FLOPs the same tokens cost at full depth.",
                                  tag_keys=("model", "policy"))
        self.flops_saved = Counter("layerexit_flops_saved", "Decode FLOPs saved by early exit (full - spent; "
                                   "only positive savings are counted).", tag_keys=("model", "policy"))
        self.ttft = Histogram("layerexit_time_to_first_token_seconds", "Time from request to first token.",
                              boundaries=latency, tag_keys=("model", "route"))
        self.latency = Histogram("layerexit_request_latency_seconds", "Time from request to last token.",
                                 boundaries=latency, tag_keys=("model", "route"))
        self.batch_size = Histogram("layerexit_batch_size", "Rows in the engine batch, per decode step.",
                                    boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256], tag_keys=("model",))
        self.cancelled = Counter("layerexit_cancelled_requests", "Requests stopped before the end (client "
                                 "disconnected or timed out).", tag_keys=("model", "reason"))
        self.running = Gauge("layerexit_running_requests", "Requests being generated.", tag_keys=("model",))
        for metric in (self.requests, self.prompt_tokens, self.completion_tokens, self.exit_layer, self.flops_spent,
                       self.flops_full, self.flops_saved, self.ttft, self.latency, self.batch_size, self.cancelled,
                       self.running):
            metric.set_default_tags({"model": model})


def _inc(counter, value: float, tags: dict[str, str] | None = None) -> None:
    """Counter.inc that skips zero/negative values (Ray rejects them) and never fails a request."""
    if value > 0:
        try:
            counter.inc(value, tags=tags)
        except Exception:  # noqa: BLE001
            logger.exception("metric update failed")


@serve.deployment(
    name="EarlyExitLLM",
    max_ongoing_requests=32,
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=20,
)
@serve.ingress(api)
class EarlyExitLLM:
    """One replica: model, engine, scheduler, routes. Serve builds it with ``ServeArgs`` as a dict."""

    def __init__(self, args: dict[str, Any]) -> None:
        import torch

        from layerexit.engine.decode import EarlyExitEngine
        from layerexit.engine.reference import eos_ids
        from layerexit.models.loading import load_model_and_tokenizer
        from layerexit.serving.model_source import resolve_model_source

        self.args = ServeArgs.model_validate(args)
        self.model_name = self.args.served_name()
        self.api_key = None
        if self.args.api_key_env:
            self.api_key = os.environ.get(self.args.api_key_env, "")
            if not self.api_key:
                raise LayerexitError(f"api_key_env names ${self.args.api_key_env}, which is empty in the replica",
                                     "set it (ray_actor_options.runtime_env.env_vars or the pod env) or drop api_key_env")
        if self.args.torch_threads:
            torch.set_num_threads(self.args.torch_threads)
        device = self.args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype_choice = self.args.dtype_choice(device)
        dtype_name = dtype_choice.dtype
        logger.info("serving %s in %s (dtype %s: %s)", self.args.model, dtype_name, self.args.dtype,
                    dtype_choice.reason)
        t0 = time.perf_counter()
        self.source = resolve_model_source(self.args.model, self.args.mlflow_tracking_uri)
        self.model, self.tokenizer = load_model_and_tokenizer(self.source.load_spec, getattr(torch, dtype_name), device)
        self.engine = EarlyExitEngine(self.model, eos_ids(self.model, self.tokenizer), self.tokenizer.pad_token_id,
                                      compile=self.args.compile)
        self.num_layers = self.engine.L
        max_pos = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)
        self.max_positions = max_pos
        self.max_prompt_tokens = min(self.args.max_prompt_tokens, max_pos - 1)
        self.created = now()
        self.default_exit = exit_config_from_user_config(self.args.user_config, self.source.local_dir)
        self._check_exit_config(self.default_exit, "user_config")
        # KV budget vs the device, before any request can allocate (a budget the device cannot hold fails here).
        self.kv_bytes_per_token = kv_bytes_per_token(self.model.config, getattr(torch, dtype_name))
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        check_kv_budget(self.args.kv_budget_tokens, self.kv_bytes_per_token, weights, device_memory_bytes(device))
        recorded = training_template(self.args.model, self.source.version) if self.args.chat_template == "auto" else None
        self.chat_format = choose_chat_format(self.args.chat_template, self.tokenizer, recorded)
        self._score_lock = threading.Lock()  # echo prefills: one at a time beside the engine thread
        self.metrics = _Metrics(self.num_layers, self.model_name)
        self.scheduler = BatchScheduler(
            self.engine, self.args.max_batch_size, self.args.batch_wait_timeout_s, self.args.max_concurrent_batches,
            stall_timeout_s=max(120.0, self.args.request_timeout_s),
            on_step=lambda n: self.metrics.batch_size.observe(n), continuous=self.args.continuous_batching,
            kv_budget_tokens=self.args.kv_budget_tokens,
        ).start()
        self._thresholds_cache: dict[str, dict[int, float] | None] = {}
        self._running = 0
        # Warm-up: one short generation so the first request does not pay for lazy initialisation.
        warm = self.tokenizer("Hello", add_special_tokens=True)["input_ids"] or [self.tokenizer.pad_token_id]
        self.engine.generate([warm], ExitConfig(policy="final"), SamplingParams(max_new_tokens=2, temperature=0.0))
        self._log({"event": "replica_ready", "model": self.model_name, "spec": self.args.model,
                   "version": self.source.version, "device": device, "dtype": dtype_name,
                   "num_layers": self.num_layers, "load_s": round(time.perf_counter() - t0, 2),
                   "chat_format": self.chat_format, "kv_budget_tokens": self.args.kv_budget_tokens,
                   "kv_bytes_per_token": self.kv_bytes_per_token,
                   "default_exit": self.default_exit.model_dump(exclude_none=True)})

    # ------------------------------------------------------------------------------------ Serve hooks
    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """New default exit policy/thresholds/KV (Serve calls this on a user_config change, without restart)."""
        config = exit_config_from_user_config(user_config, self.source.local_dir)
        self._check_exit_config(config, "user_config")
        self.default_exit = config
        self._thresholds_cache.clear()
        self._log({"event": "reconfigure", "default_exit": config.model_dump(exclude_none=True)})

    def check_health(self) -> None:
        self.scheduler.check()

    def __del__(self) -> None:
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None:
            scheduler.stop(timeout=1.0)

    # ------------------------------------------------------------------------------------ helpers
    def _check_exit_config(self, config: ExitConfig, param: str) -> None:
        try:
            config.build_policy(self.num_layers)
        except LayerexitError as err:
            if param == "user_config":
                raise
            raise config_error_to_api_error(err, param) from None

    def _thresholds(self, config: ExitConfig) -> dict[int, float] | None:
        if config.policy != "confidence":
            return None
        key = exit_config_key(config)
        if key not in self._thresholds_cache:
            if len(self._thresholds_cache) >= 256:  # per-request tables: keep the cache bounded
                self._thresholds_cache.clear()
            self._thresholds_cache[key] = config.resolved_thresholds(self.num_layers)[0]
        return self._thresholds_cache[key]

    def _log(self, record: dict[str, Any]) -> None:
        logger.info(json.dumps({"logger": "layerexit.serving", **record}, default=str))

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Invalid or missing API key: send `Authorization: Bearer <key>`.",
                           code="invalid_api_key")

    async def _parse(self, request: Request, model: type):
        body = await request.body()
        try:
            data = json.loads(body) if body else None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"We could not parse the JSON body of your request ({err}).",
                           code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
        try:
            parsed = model.model_validate(data)
        except ValidationError as err:
            raise validation_error_to_api_error(err) from None
        if parsed.model not in (self.model_name, self.args.model):
            raise APIError(404, f"The model `{parsed.model}` does not exist; this server has `{self.model_name}`.",
                           param="model", code="model_not_found")
        return parsed

    def _prompts(self, body: CompletionRequest | ChatCompletionRequest) -> list[tuple[list[int], str]]:
        """(prompt ids, prompt text) per prompt of the request (a chat has one; a completion prompt list many)."""
        tok = self.tokenizer
        param = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
        if isinstance(body, ChatCompletionRequest):
            try:
                ids = chat_prompt_ids(tok, body.chat_messages(), self.chat_format)
            except ChatFormatError as err:
                raise APIError(400, str(err), param="messages") from None
            prompts = [(ids, "")]
        else:
            items = body.prompts()
            if len(items) * (body.n or 1) > self.args.max_choices:
                raise APIError(400, f"{len(items)} prompts x n={body.n or 1} is {len(items) * (body.n or 1)} choices;"
                               f" this server allows at most {self.args.max_choices} per request.", param="prompt",
                               code="invalid_value")
            prompts = []
            vocab = self.model.config.vocab_size
            for prompt in items:
                if isinstance(prompt, str):
                    prompts.append((list(tok(prompt, add_special_tokens=True)["input_ids"]), prompt))
                    continue
                bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < vocab]
                if bad:
                    raise APIError(400, f"prompt token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})",
                                   param="prompt")
                prompts.append((list(prompt), tok.decode(prompt, skip_special_tokens=True)))
        for ids, _text in prompts:
            if not ids:
                raise APIError(400, "The prompt is empty.", param=param)
            if len(ids) > self.max_prompt_tokens:
                raise APIError(400, f"The prompt has {len(ids)} tokens; this server accepts at most "
                               f"{self.max_prompt_tokens}.", param=param, code="context_length_exceeded")
        return prompts

    def _plan(self, body, prompts: list[tuple[list[int], str]]) -> tuple[ExitConfig, SamplingParams, int]:
        """(exit config, sampling settings, n) for a parsed request; 400s name the field."""
        n = body.n or 1
        if n > self.args.max_choices:
            raise APIError(400, f"n is {n}; this server allows at most {self.args.max_choices} choices per request.",
                           param="n", code="invalid_value")
        max_tokens = body.max_tokens if body.max_tokens is not None else self.args.default_max_tokens
        if max_tokens > self.args.max_tokens_limit:
            raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most "
                           f"{self.args.max_tokens_limit}.", param="max_tokens", code="invalid_value")
        longest = max(len(ids) for ids, _ in prompts)
        if longest + max_tokens > self.max_positions:
            raise APIError(400, f"The prompt ({longest} tokens) plus max_tokens ({max_tokens}) exceeds the "
                           f"model's context of {self.max_positions} tokens.", param="max_tokens",
                           code="context_length_exceeded")
        budget = self.args.kv_budget_tokens
        if budget is not None and longest + max_tokens > budget:
            raise APIError(400, f"The prompt ({longest} tokens) plus max_tokens ({max_tokens}) needs more KV cache "
                           f"than this server's whole budget ({budget} token positions); lower max_tokens.",
                           param="max_tokens", code="context_length_exceeded")
        try:
            config = merge_exit_config(self.default_exit, body.early_exit)
        except ValidationError as err:
            raise validation_error_to_api_error(err, prefix=("early_exit",)) from None
        self._check_exit_config(config, "early_exit")
        temperature = body.temperature
        if temperature is None:
            temperature = 0.0 if config.policy == "self-speculative" else self.args.default_temperature
        if config.policy == "self-speculative" and temperature > 0:
            raise APIError(400, "policy self-speculative is lossless only for greedy decoding; use temperature 0.",
                           param="temperature", code="invalid_value")
        logprobs = body.logprobs_k() if isinstance(body, ChatCompletionRequest) else body.logprobs
        sampling = SamplingParams(max_new_tokens=max(max_tokens, 1), temperature=temperature,
                                  top_p=body.top_p if body.top_p is not None else 1.0, seed=body.seed,
                                  logprobs=logprobs)
        try:
            sampling.validate()
        except LayerexitError as err:
            raise APIError(400, str(err), code="invalid_value") from None
        return config, sampling, n

    def _choice_gen(self, route: str, plan: ChoicePlan, config: ExitConfig, stats: ExitStatsAccumulator,
                    stops: list[str], started: float):
        """One choice's generator with metrics, the running gauge and errors mapped to APIError."""
        policy = config.policy

        def first(outcome: Outcome, _batch) -> None:
            self.metrics.ttft.observe(outcome.ttft, tags={"route": route})

        def token(layer: int) -> None:
            self.metrics.exit_layer.observe(layer, tags={"policy": policy})

        async def run():
            self._running += 1
            self.metrics.running.set(self._running)
            last = None
            try:
                async with contextlib.aclosing(generate_choice(
                        self.scheduler, self.tokenizer, plan, config, stats, stops, self.args.request_timeout_s,
                        started, on_first=first, on_token=token)) as items:
                    async for item in items:
                        last = item[2]
                        yield item
            except TimeoutError:
                self.metrics.cancelled.inc(tags={"reason": "timeout"})
                raise APIError(504, f"The request did not finish within {self.args.request_timeout_s:g} s.",
                               code="timeout") from None
            except SchedulerError as err:
                raise APIError(503, f"The model replica is not able to generate right now ({err}).",
                               code="engine_unavailable") from None
            except LayerexitError as err:
                raise config_error_to_api_error(err, None) from None
            finally:
                self._running -= 1
                self.metrics.running.set(self._running)
                if last is not None:
                    self._record(last, policy)

        return run()

    def _start_choices(self, body, route: str, prompts, config: ExitConfig, sampling: SamplingParams, n: int,
                       started: float) -> tuple[list[ChoicePlan], list[ExitStatsAccumulator], list]:
        """Plans, one stats accumulator and one generator per choice (no generators for max_tokens 0)."""
        plans = plan_choices(prompts, n, sampling)
        thresholds = self._thresholds(config)
        stats = [ExitStatsAccumulator(config, self.num_layers, thresholds) for _ in plans]
        echo = isinstance(body, CompletionRequest) and bool(body.echo)
        if sampling.logprobs is not None:
            for s in stats:
                s.logprobs_from = LOGPROBS_FROM_EXIT + (LOGPROBS_FROM_ECHO if echo else "")
        gens = []
        if not (body.max_tokens == 0):
            gens = [self._choice_gen(route, p, config, s, body.stop_list(), started) for p, s in zip(plans, stats)]
        return plans, stats, gens

    async def _echo_scores(self, body, plans: list[ChoicePlan], logprobs: int | None) -> None:
        """Full-depth prompt log-probs for echo + logprobs (one prefill per distinct prompt, off the event loop)."""
        if not (isinstance(body, CompletionRequest) and body.echo and logprobs is not None):
            return
        done: dict[tuple[int, ...], TokenScores] = {}
        for plan in plans:
            key = tuple(plan.prompt_ids)
            if key not in done:
                scored = await asyncio.to_thread(self._score, plan.prompt_ids, logprobs)
                done[key] = TokenScores(list(plan.prompt_ids), scored.logprobs, scored.top)
            plan.echo = done[key]

    def _score(self, ids: list[int], k: int):
        with self._score_lock:
            return score_prompt(self.model, ids, top_k=k)

    def _record(self, outcome: Outcome, policy: str) -> None:
        stats = outcome.stats
        tags = {"policy": policy}
        m = self.metrics
        _inc(m.completion_tokens, outcome.completion_tokens, tags)
        _inc(m.flops_spent, stats.flops, tags)
        _inc(m.flops_full, stats.flops_full, tags)
        _inc(m.flops_saved, stats.flops_full - stats.flops, tags)

    def _finish_log(self, route: str, request_id: str, status: int, started: float, *, prompts=None,
                    stats: list[ExitStatsAccumulator] | None = None, outcomes: list[Outcome] | None = None,
                    stream: bool = False, error: APIError | None = None, prompt_text: Any = None) -> None:
        latency = time.perf_counter() - started
        self.metrics.requests.inc(tags={"route": route, "status": str(status)})
        record: dict[str, Any] = {"event": "request", "request_id": request_id, "route": route, "status": status,
                                  "stream": stream, "latency_s": round(latency, 4)}
        if prompts is not None:
            record["prompt_tokens"] = sum(len(ids) for ids, _ in prompts)
        if stats:
            s = ExitStatsAccumulator.merged(stats).stats()
            outs = [o for o in (outcomes or []) if o is not None]
            ttfts = [o.ttft for o in outs if o.ttft is not None]
            record.update(choices=len(stats), completion_tokens=sum(o.completion_tokens for o in outs),
                          finish_reason=[o.finish_reason for o in outs] if len(outs) > 1
                          else (outs[0].finish_reason if outs else None),
                          ttft_s=round(min(ttfts), 4) if ttfts else None, policy=s.policy, kv=s.kv,
                          mean_exit_layer=s.mean_exit_layer, flops_saved_fraction=s.flops_saved_fraction,
                          batch_size=s.batch_size)
            if status == 200:
                self.metrics.latency.observe(latency, tags={"route": route})
            if self.args.log_prompts:
                record["completion"] = [o.text for o in outs]
        if error is not None:
            record.update(error_type=error.type, error_code=error.code, error=error.message)
        if self.args.log_prompts and prompt_text is not None:
            record["prompt"] = prompt_text
        self._log(record)

    # ------------------------------------------------------------------------------------ routes
    @api.get("/health")
    async def health(self):
        try:
            self.scheduler.check()
        except SchedulerError as err:
            return _error_response(APIError(503, str(err), code="engine_unavailable"))
        return {"status": "ok"}

    @api.get("/v1/models")
    async def list_models(self, request: Request):
        return await self._safe(self._models, request)

    @api.get("/v1/models/{model_id:path}")
    async def get_model(self, model_id: str, request: Request):
        return await self._safe(self._model, request, model_id)

    @api.get("/v1/early_exit")
    async def early_exit_status(self, request: Request):
        return await self._safe(self._status, request)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._safe(self._handle, request, "completions", CompletionRequest)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._safe(self._handle, request, "chat", ChatCompletionRequest)

    def _card(self) -> ModelCard:
        return ModelCard(id=self.model_name, created=self.created, num_layers=self.num_layers,
                         max_prompt_tokens=self.max_prompt_tokens, max_tokens=self.args.max_tokens_limit)

    async def _models(self, request: Request):
        self._authorize(request)
        return JSONResponse(ModelList(data=[self._card()]).model_dump())

    async def _model(self, request: Request, model_id: str):
        self._authorize(request)
        if model_id not in (self.model_name, self.args.model):
            raise APIError(404, f"The model `{model_id}` does not exist; this server has `{self.model_name}`.",
                           param="model", code="model_not_found")
        return JSONResponse(self._card().model_dump())

    async def _status(self, request: Request):
        """The replica's default exit config and batching counters (no prompt data)."""
        self._authorize(request)
        try:
            replica = serve.get_replica_context().replica_tag
        except Exception:  # noqa: BLE001 - outside a replica
            replica = None
        thresholds = self._thresholds(self.default_exit)
        return JSONResponse({
            "model": self.model_name,
            "spec": self.args.model,
            "version": self.source.version,
            "num_layers": self.num_layers,
            "default_exit": self.default_exit.model_dump(mode="json", exclude_none=True),
            "default_thresholds": {str(k): v for k, v in sorted(thresholds.items())} if thresholds else None,
            "replica": replica,
            "pid": os.getpid(),
            "running_requests": self._running,
            "scheduler": self.scheduler.snapshot(),
            "limits": {"max_prompt_tokens": self.max_prompt_tokens, "max_tokens": self.args.max_tokens_limit,
                       "max_batch_size": self.args.max_batch_size, "max_choices": self.args.max_choices,
                       "kv_budget_tokens": self.args.kv_budget_tokens,
                       "request_timeout_s": self.args.request_timeout_s},
        })

    async def _handle(self, request: Request, route: str, model: type) -> Any:
        started = time.perf_counter()
        rid = new_id("chatcmpl" if model is ChatCompletionRequest else "cmpl")
        prompts = None
        body = None
        try:
            self._authorize(request)
            body = await self._parse(request, model)
            prompts = self._prompts(body)
            config, sampling, n = self._plan(body, prompts)
            _inc(self.metrics.prompt_tokens, sum(len(ids) for ids, _ in prompts))
            plans, stats, gens = self._start_choices(body, route, prompts, config, sampling, n, started)
            await self._echo_scores(body, plans, sampling.logprobs)
        except APIError as err:
            self._finish_log(route, rid, err.status, started, prompts=prompts, error=err)
            return _error_response(err)
        prompt_text = None
        if self.args.log_prompts:
            prompt_text = body.chat_messages() if isinstance(body, ChatCompletionRequest) else [t for _, t in prompts]
        if body.stream:
            return StreamingResponse(
                self._stream(route, rid, body, prompts, plans, stats, gens, sampling.logprobs, started, prompt_text),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Request-Id": rid},
            )
        try:
            outcomes = await collect(gens) if gens else [Outcome(p.index, s, finish_reason="length")
                                                          for p, s in zip(plans, stats)]
        except APIError as err:
            self._finish_log(route, rid, err.status, started, prompts=prompts, stats=stats, error=err,
                             prompt_text=prompt_text)
            return _error_response(err)
        except asyncio.CancelledError:
            self.metrics.cancelled.inc(tags={"reason": "client_disconnected"})
            self._finish_log(route, rid, 499, started, prompts=prompts, stats=stats, prompt_text=prompt_text)
            raise
        response = self._response(body, rid, prompts, plans, outcomes, sampling.logprobs)
        self._finish_log(route, rid, 200, started, prompts=prompts, stats=stats, outcomes=outcomes,
                         prompt_text=prompt_text)
        return JSONResponse(response.model_dump(), headers={"X-Request-Id": rid})

    def _usage(self, prompts, outcomes) -> Usage:
        prompt_tokens = sum(len(ids) for ids, _ in prompts)
        completion = sum(o.completion_tokens for o in outcomes if o is not None)
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion)

    def _completion_logprobs(self, plan: ChoicePlan, scores: TokenScores, k: int, offset0: int):
        if plan.echo is not None:
            echo = plan.echo
            scores = TokenScores(echo.ids + scores.ids, echo.logprobs + scores.logprobs, echo.top + scores.top)
        return completion_logprobs(self.tokenizer, scores, k, offset0)

    def _response(self, body, rid: str, prompts, plans: list[ChoicePlan], outcomes: list[Outcome],
                  k: int | None) -> ChatCompletionResponse | CompletionResponse:
        usage = self._usage(prompts, outcomes)
        merged = ExitStatsAccumulator.merged([o.stats for o in outcomes]).stats()
        if isinstance(body, ChatCompletionRequest):
            choices = [ChatChoice(index=o.index, message=ChatResponseMessage(content=o.text),
                                  finish_reason=o.finish_reason, early_exit=o.stats.stats(),
                                  logprobs=None if k is None else chat_logprobs(
                                      self.tokenizer, o.scores.slice(0, o.sent_tokens), k))
                       for o in outcomes]
            return ChatCompletionResponse(id=rid, created=now(), model=self.model_name, usage=usage,
                                          early_exit=merged, choices=choices)
        choices = []
        for plan, o in zip(plans, outcomes):
            prefix = plan.prompt_text if body.echo else ""
            logprobs = None
            if k is not None:
                logprobs = self._completion_logprobs(plan, o.scores.slice(0, o.sent_tokens), k, 0)
            choices.append(CompletionChoice(index=o.index, text=prefix + o.text, finish_reason=o.finish_reason,
                                            early_exit=o.stats.stats(), logprobs=logprobs))
        return CompletionResponse(id=rid, created=now(), model=self.model_name, usage=usage, early_exit=merged,
                                  choices=choices)

    async def _stream(self, route: str, rid: str, body, prompts, plans: list[ChoicePlan],
                      stats: list[ExitStatsAccumulator], gens: list, k: int | None, started: float,
                      prompt_text: Any) -> AsyncIterator[str]:
        chat = isinstance(body, ChatCompletionRequest)
        echo = not chat and bool(body.echo)
        created = now()
        include_usage = body.include_usage()

        def chunk(index: int, text: str | None, finish: str | None = None, early_exit=None, role: bool = False,
                  logprobs=None):
            if chat:
                delta = ChatDelta(role="assistant" if role else None, content=text)
                return ChatCompletionChunk(id=rid, created=created, model=self.model_name, early_exit=early_exit,
                                           choices=[ChatChunkChoice(index=index, delta=delta, finish_reason=finish,
                                                                    logprobs=logprobs)])
            return CompletionChunk(id=rid, created=created, model=self.model_name, early_exit=early_exit,
                                   choices=[CompletionChunkChoice(index=index, text=text or "", finish_reason=finish,
                                                                  logprobs=logprobs)])

        outcomes: dict[int, Outcome] = {}
        status = 200
        error = None
        try:
            offsets = {p.index: 0 for p in plans}  # text offset (completions logprobs) and tokens sent per choice
            sent = {p.index: 0 for p in plans}
            for plan in plans:
                if chat:
                    yield sse(chunk(plan.index, "", role=True))
                elif echo:
                    lp = None if k is None else self._completion_logprobs(plan, TokenScores(), k, 0)
                    offsets[plan.index] = len(plan.prompt_text)
                    yield sse(chunk(plan.index, plan.prompt_text, logprobs=lp))
            if gens:
                async with contextlib.aclosing(merge(gens)) as items:
                    async for delta, layers, outcome, last in items:
                        i = outcome.index
                        outcomes[i] = outcome
                        if delta or layers:
                            lp = None
                            if k is not None:  # the tokens this delta completes: one exit layer each
                                part = outcome.scores.slice(sent[i], sent[i] + len(layers))
                                lp = (chat_logprobs(self.tokenizer, part, k) if chat
                                      else completion_logprobs(self.tokenizer, part, k, offsets[i]))
                            sent[i] += len(layers)
                            offsets[i] += len(delta)
                            if delta or lp is not None:
                                yield sse(chunk(i, delta, early_exit=ChunkExit(exit_layers=layers), logprobs=lp))
                        if last:
                            yield sse(chunk(i, None if chat else "", finish=outcome.finish_reason,
                                            early_exit=outcome.stats.stats()))
            else:  # max_tokens 0 (echo only)
                for plan, st in zip(plans, stats):
                    outcomes[plan.index] = Outcome(plan.index, st, finish_reason="length")
                    yield sse(chunk(plan.index, None if chat else "", finish="length", early_exit=st.stats()))
            if include_usage:
                cls = ChatCompletionChunk if chat else CompletionChunk
                yield sse(cls(id=rid, created=created, model=self.model_name, choices=[],
                              usage=self._usage(prompts, list(outcomes.values()))))
            yield SSE_DONE
        except APIError as err:
            status, error = err.status, err
            yield sse(err.body())
        except (asyncio.CancelledError, GeneratorExit):
            status = 499  # client closed the connection
            self.metrics.cancelled.inc(tags={"reason": "client_disconnected"})
            raise
        except Exception as err:  # noqa: BLE001 - reported in the stream; the replica keeps serving
            logger.exception("streaming request failed")
            status, error = 500, APIError(500, f"Internal error while generating: {type(err).__name__}",
                                          type="server_error")
            yield sse(error.body())
        finally:
            self._finish_log(route, rid, status, started, prompts=prompts, stats=stats,
                             outcomes=list(outcomes.values()), stream=True, error=error, prompt_text=prompt_text)

    async def _safe(self, coro_fn, *args) -> Any:
        try:
            return await coro_fn(*args)
        except APIError as err:
            return _error_response(err)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - never leak a traceback; log it
            logger.exception("request failed")
            return _error_response(APIError(500, f"Internal error: {type(err).__name__}", type="server_error"))

