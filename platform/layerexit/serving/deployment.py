"""The Ray Serve deployment: one early-exit model per replica behind an OpenAI-compatible FastAPI ingress.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (streaming or not),
``GET /v1/early_exit`` (the replica's default exit config and batching counters), ``GET /health``.

- The model loads once per replica (``__init__``); ``reconfigure(user_config)`` swaps the default exit policy
  and thresholds live; ``check_health`` fails when the engine worker died or stalled.
- Generation runs on the ``BatchScheduler`` worker thread (dynamic batching, see ``scheduler.py``); a request
  whose client disconnects, times out or hits a stop string is cancelled and stops using the engine.
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
from layerexit.serving.config import ServeArgs, exit_config_from_user_config
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
    TextAssembler,
    Usage,
    config_error_to_api_error,
    exit_config_key,
    merge_exit_config,
    new_id,
    now,
    sse,
    validation_error_to_api_error,
)
from layerexit.serving.scheduler import BatchScheduler, GenerationRequest, SchedulerError

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


class _Outcome:
    """What one generation produced, for the response, metrics and the log line."""

    def __init__(self, stats: ExitStatsAccumulator) -> None:
        self.stats = stats
        self.text = ""
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.ttft: float | None = None


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
        dtype_name = self.args.dtype
        if dtype_name == "auto":
            dtype_name = "bfloat16" if device.startswith("cuda") else "float32"
        t0 = time.perf_counter()
        self.source = resolve_model_source(self.args.model, self.args.mlflow_tracking_uri)
        self.model, self.tokenizer = load_model_and_tokenizer(self.source.load_spec, getattr(torch, dtype_name), device)
        self.engine = EarlyExitEngine(self.model, eos_ids(self.model, self.tokenizer), self.tokenizer.pad_token_id)
        self.num_layers = self.engine.L
        max_pos = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)
        self.max_positions = max_pos
        self.max_prompt_tokens = min(self.args.max_prompt_tokens, max_pos - 1)
        self.created = now()
        self.default_exit = exit_config_from_user_config(self.args.user_config, self.source.local_dir)
        self._check_exit_config(self.default_exit, "user_config")
        self.metrics = _Metrics(self.num_layers, self.model_name)
        self.scheduler = BatchScheduler(
            self.engine, self.args.max_batch_size, self.args.batch_wait_timeout_s, self.args.max_concurrent_batches,
            stall_timeout_s=max(120.0, self.args.request_timeout_s),
            on_step=lambda n: self.metrics.batch_size.observe(n), continuous=self.args.continuous_batching,
        ).start()
        self._thresholds_cache: dict[str, dict[int, float] | None] = {}
        self._running = 0
        # Warm-up: one short generation so the first request does not pay for lazy initialisation.
        warm = self.tokenizer("Hello", add_special_tokens=True)["input_ids"] or [self.tokenizer.pad_token_id]
        self.engine.generate([warm], ExitConfig(policy="final"), SamplingParams(max_new_tokens=2, temperature=0.0))
        self._log({"event": "replica_ready", "model": self.model_name, "spec": self.args.model,
                   "version": self.source.version, "device": device, "dtype": dtype_name,
                   "num_layers": self.num_layers, "load_s": round(time.perf_counter() - t0, 2),
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

    def _prompt_ids(self, body: CompletionRequest | ChatCompletionRequest) -> list[int]:
        tok = self.tokenizer
        if isinstance(body, ChatCompletionRequest):
            if not getattr(tok, "chat_template", None):
                raise APIError(400, "This model has no chat template; use /v1/completions.", param="messages")
            try:
                ids = tok.apply_chat_template(body.chat_messages(), add_generation_prompt=True, tokenize=True,
                                              return_dict=False)
            except Exception as err:  # noqa: BLE001 - jinja TemplateError (e.g. roles must alternate)
                raise APIError(400, f"The chat template rejected these messages: {err}", param="messages") from None
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
            ids = list(ids)
        else:
            prompt = body.single_prompt()
            if isinstance(prompt, str):
                ids = list(tok(prompt, add_special_tokens=True)["input_ids"])
            else:
                vocab = self.model.config.vocab_size
                bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < vocab]
                if bad:
                    raise APIError(400, f"prompt token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})",
                                   param="prompt")
                ids = list(prompt)
        if not ids:
            raise APIError(400, "The prompt is empty.", param="prompt" if isinstance(body, CompletionRequest)
                           else "messages")
        if len(ids) > self.max_prompt_tokens:
            raise APIError(400, f"The prompt has {len(ids)} tokens; this server accepts at most "
                           f"{self.max_prompt_tokens}.", param="messages" if isinstance(body, ChatCompletionRequest)
                           else "prompt", code="context_length_exceeded")
        return ids

    def _plan(self, body, prompt_ids: list[int]) -> tuple[ExitConfig, SamplingParams]:
        max_tokens = body.max_tokens if body.max_tokens is not None else self.args.default_max_tokens
        if max_tokens > self.args.max_tokens_limit:
            raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most "
                           f"{self.args.max_tokens_limit}.", param="max_tokens", code="invalid_value")
        if len(prompt_ids) + max_tokens > self.max_positions:
            raise APIError(400, f"The prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds the "
                           f"model's context of {self.max_positions} tokens.", param="max_tokens",
                           code="context_length_exceeded")
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
        sampling = SamplingParams(max_new_tokens=max_tokens, temperature=temperature,
                                  top_p=body.top_p if body.top_p is not None else 1.0, seed=body.seed)
        try:
            sampling.validate()
        except LayerexitError as err:
            raise APIError(400, str(err), code="invalid_value") from None
        return config, sampling

    async def _generate(self, route: str, prompt_ids: list[int], config: ExitConfig, sampling: SamplingParams,
                        stops: list[str], started: float) -> AsyncIterator[tuple[str, list[int], _Outcome]]:
        """Yield (text delta, exit layers, outcome so far); the outcome is final after the last item."""
        outcome = _Outcome(ExitStatsAccumulator(config, self.num_layers, self._thresholds(config)))
        assembler = TextAssembler(self.tokenizer, stops)
        request = GenerationRequest(prompt_ids, config, sampling, key=exit_config_key(config))
        policy = config.policy
        self._running += 1
        self.metrics.running.set(self._running)
        try:
            async with contextlib.aclosing(self.scheduler.events(request, self.args.request_timeout_s)) as stream:
                async for batch in stream:
                    if outcome.ttft is None:
                        outcome.ttft = time.perf_counter() - started
                        outcome.stats.batch_size = batch.batch_size
                        outcome.stats.prefill_flops = batch.prefill_flops
                        self.metrics.ttft.observe(outcome.ttft, tags={"route": route})
                    text, layers, done = "", [], False
                    for ev in batch.events:
                        outcome.completion_tokens += 1
                        outcome.stats.add(ev.exit_layer, ev.flops, ev.flops_full)
                        self.metrics.exit_layer.observe(ev.exit_layer, tags={"policy": policy})
                        delta, delta_layers = assembler.add(ev.token_id, ev.exit_layer)
                        text, layers = text + delta, layers + delta_layers
                        if assembler.stopped or ev.finished:
                            outcome.finish_reason = "stop" if assembler.stopped else ev.finish_reason
                            tail, tail_layers = assembler.finish()
                            text, layers, done = text + tail, layers + tail_layers, True
                            break
                    outcome.text += text
                    if text or done:
                        yield text, layers, outcome  # one chunk per engine read, however many tokens it holds
                    if done:
                        return
            if outcome.finish_reason is None:  # the batch ended without a last token for this request
                tail, tail_layers = assembler.finish()
                outcome.text += tail
                outcome.finish_reason = "length"
                yield tail, tail_layers, outcome
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
            self._record(outcome, policy)

    def _record(self, outcome: _Outcome, policy: str) -> None:
        stats = outcome.stats
        tags = {"policy": policy}
        m = self.metrics
        _inc(m.completion_tokens, outcome.completion_tokens, tags)
        _inc(m.flops_spent, stats.flops, tags)
        _inc(m.flops_full, stats.flops_full, tags)
        _inc(m.flops_saved, stats.flops_full - stats.flops, tags)

    def _finish_log(self, route: str, request_id: str, status: int, started: float, *, prompt_ids=None,
                    outcome: _Outcome | None = None, stream: bool = False, error: APIError | None = None,
                    prompt_text: Any = None) -> None:
        latency = time.perf_counter() - started
        self.metrics.requests.inc(tags={"route": route, "status": str(status)})
        record: dict[str, Any] = {"event": "request", "request_id": request_id, "route": route, "status": status,
                                  "stream": stream, "latency_s": round(latency, 4)}
        if prompt_ids is not None:
            record["prompt_tokens"] = len(prompt_ids)
        if outcome is not None:
            s = outcome.stats.stats()
            record.update(completion_tokens=outcome.completion_tokens, finish_reason=outcome.finish_reason,
                          ttft_s=None if outcome.ttft is None else round(outcome.ttft, 4), policy=s.policy, kv=s.kv,
                          mean_exit_layer=s.mean_exit_layer, flops_saved_fraction=s.flops_saved_fraction,
                          batch_size=s.batch_size)
            if status == 200:
                self.metrics.latency.observe(latency, tags={"route": route})
            if self.args.log_prompts:
                record["completion"] = outcome.text
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
                       "max_batch_size": self.args.max_batch_size,
                       "request_timeout_s": self.args.request_timeout_s},
        })

    async def _handle(self, request: Request, route: str, model: type) -> Any:
        started = time.perf_counter()
        rid = new_id("chatcmpl" if model is ChatCompletionRequest else "cmpl")
        prompt_ids = None
        body = None
        try:
            self._authorize(request)
            body = await self._parse(request, model)
            prompt_ids = self._prompt_ids(body)
            config, sampling = self._plan(body, prompt_ids)
            _inc(self.metrics.prompt_tokens, len(prompt_ids))
        except APIError as err:
            self._finish_log(route, rid, err.status, started, prompt_ids=prompt_ids, error=err)
            return _error_response(err)
        prompt_text = None
        if self.args.log_prompts:
            prompt_text = body.chat_messages() if isinstance(body, ChatCompletionRequest) else body.single_prompt()
        gen = self._generate(route, prompt_ids, config, sampling, body.stop_list(), started)
        if body.stream:
            return StreamingResponse(
                self._stream(route, rid, body, prompt_ids, gen, started, prompt_text),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Request-Id": rid},
            )
        outcome = None
        try:
            async with contextlib.aclosing(gen) as items:
                async for _delta, _layers, outcome in items:
                    pass
        except APIError as err:
            self._finish_log(route, rid, err.status, started, prompt_ids=prompt_ids, outcome=outcome, error=err,
                             prompt_text=prompt_text)
            return _error_response(err)
        except asyncio.CancelledError:
            self.metrics.cancelled.inc(tags={"reason": "client_disconnected"})
            self._finish_log(route, rid, 499, started, prompt_ids=prompt_ids, outcome=outcome,
                             prompt_text=prompt_text)
            raise
        usage = Usage(prompt_tokens=len(prompt_ids), completion_tokens=outcome.completion_tokens,
                      total_tokens=len(prompt_ids) + outcome.completion_tokens)
        stats = outcome.stats.stats()
        if isinstance(body, ChatCompletionRequest):
            response = ChatCompletionResponse(
                id=rid, created=now(), model=self.model_name, usage=usage, early_exit=stats,
                choices=[ChatChoice(message=ChatResponseMessage(content=outcome.text),
                                    finish_reason=outcome.finish_reason)])
        else:
            response = CompletionResponse(
                id=rid, created=now(), model=self.model_name, usage=usage, early_exit=stats,
                choices=[CompletionChoice(text=outcome.text, finish_reason=outcome.finish_reason)])
        self._finish_log(route, rid, 200, started, prompt_ids=prompt_ids, outcome=outcome, prompt_text=prompt_text)
        return JSONResponse(response.model_dump(), headers={"X-Request-Id": rid})

    async def _stream(self, route: str, rid: str, body, prompt_ids: list[int], gen, started: float,
                      prompt_text: Any) -> AsyncIterator[str]:
        chat = isinstance(body, ChatCompletionRequest)
        created = now()
        include_usage = body.include_usage()

        def chunk(text: str | None, finish: str | None = None, early_exit=None, role: bool = False):
            if chat:
                delta = ChatDelta(role="assistant" if role else None, content=text)
                return ChatCompletionChunk(id=rid, created=created, model=self.model_name, early_exit=early_exit,
                                           choices=[ChatChunkChoice(delta=delta, finish_reason=finish)])
            return CompletionChunk(id=rid, created=created, model=self.model_name, early_exit=early_exit,
                                   choices=[CompletionChunkChoice(text=text or "", finish_reason=finish)])

        outcome = None
        status = 200
        error = None
        try:
            if chat:
                yield sse(chunk("", role=True))
            async with contextlib.aclosing(gen) as items:
                async for delta, layers, outcome in items:
                    if delta:
                        yield sse(chunk(delta, early_exit=ChunkExit(exit_layers=layers)))
            stats = outcome.stats.stats()
            yield sse(chunk(None if chat else "", finish=outcome.finish_reason, early_exit=stats))
            if include_usage:
                usage = Usage(prompt_tokens=len(prompt_ids), completion_tokens=outcome.completion_tokens,
                              total_tokens=len(prompt_ids) + outcome.completion_tokens)
                cls = ChatCompletionChunk if chat else CompletionChunk
                yield sse(cls(id=rid, created=created, model=self.model_name, choices=[], usage=usage))
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
            self._finish_log(route, rid, status, started, prompt_ids=prompt_ids, outcome=outcome, stream=True,
                             error=error, prompt_text=prompt_text)

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

