"""The OpenAI-compatible wire format (completions, chat completions, streaming chunks, errors) and our
``early_exit`` extension, plus the pure logic around it (stop strings, exit statistics, error mapping).

Requests reject unknown fields like OpenAI does (``Unrecognized request argument``): a misspelt parameter is
a 400 naming it, not a silently ignored setting. ``n``, ``logprobs``/``top_logprobs``, ``echo`` and prompt lists
are supported (``logprobs.py`` builds their response shapes); fields OpenAI defines but we cannot honour
(``tools``, ``response_format`` other than text, ``suffix``, ``best_of`` > 1...) are accepted only at their
neutral value.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from layerexit.engine.options import ExitConfig
from layerexit.engine.thresholds import PRESETS
from layerexit.errors import LayerexitError

# ------------------------------------------------------------------------------------------------- errors

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


class APIError(Exception):
    """An error with its HTTP status, returned to the client as an OpenAI-style error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:  # noqa: A002 - OpenAI's field name
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.type, param=self.param,
                                               code=self.code)).model_dump()


def validation_error_to_api_error(err: ValidationError | Sequence[dict], prefix: Sequence[str | int] = ()) -> APIError:
    """A pydantic ValidationError (or FastAPI's error list) as a 400 naming the first bad field."""
    errors = err.errors() if isinstance(err, ValidationError) else list(err)
    messages, first_param = [], None
    for e in errors:
        loc = [*prefix, *[p for p in e.get("loc", ()) if p != "body"]]
        # pydantic puts the union member tried into the location (``thresholds.dict[int,float]``); drop those.
        loc = [p for p in loc if not (isinstance(p, str) and ("[" in p or p in ("str", "int", "float", "list")))]
        msg = e.get("msg", "invalid value")
        if e.get("type") == "extra_forbidden":
            msg = "Unrecognized request argument supplied"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if msg.startswith(_FIELD_MARK):  # a model-level check that names its field (ValueError_at)
            field, msg = msg[1:].split(_FIELD_MARK, 1)
            loc = [*loc, *field.split(".")]
        param = ".".join(str(p) for p in loc) or None
        first_param = first_param or param
        messages.append(f"{param}: {msg}" if param else msg)
    return APIError(400, "; ".join(dict.fromkeys(messages)) or "invalid request", param=first_param,
                    code="invalid_value")


def config_error_to_api_error(err: LayerexitError, param: str | None = "early_exit") -> APIError:
    return APIError(400, str(err), param=param, code="invalid_early_exit" if param == "early_exit" else "invalid_value")


# ---------------------------------------------------------------------------------------- the extension


class EarlyExitRequest(BaseModel):
    """Request field ``early_exit``: overrides the deployment's default exit config for this request.

    Only the fields given override; the rest keep the deployment default (``reconfigure`` sets it). Thresholds
    are a preset name or ``{layer: threshold}``; a file path is accepted only in the deployment's user_config.
    """

    model_config = ConfigDict(extra="forbid")

    policy: str | None = Field(None, description="final, fixed, confidence, classifier, random, random-uniform, "
                               "sequential, self-speculative.")
    thresholds: str | dict[int, float] | None = Field(None, description=f"A preset ({', '.join(PRESETS)}) or "
                                                      "{layer: threshold in [0, 1]}.")
    exit_layers: list[int] | None = Field(None, description="Checkpoint layers for random/sequential.")
    layer: int | None = Field(None, description="Exit layer for fixed; draft layer for self-speculative.")
    kv: str | None = Field(None, description="none, propagate or recompute.")
    num_draft: int | None = Field(None, description="Draft tokens per verification (self-speculative).")
    check_vocab: int | str | None = Field(None, description="Exit checks over the full vocabulary (\"full\") or the top-K "
                                          "candidates of a token's first check (an int K).")
    check_head: str | None = Field(None, description="Head exit checks score over: full, candidates or static.")
    preset: str | None = Field(None, description="An exit preset the served model ships (e.g. \"tuned\", registered by "
                               "the threshold search): the request starts from it instead of the deployment default.")
    draft: str | None = Field(None, description="Self-speculative draft source: layer, ngram or layer+ngram.")
    draft_stop: float | None = Field(None, description="Draft-confidence threshold that ends a layer draft "
                                     "(dynamic draft length); unset keeps num_draft fixed.")

    @field_validator("thresholds")
    @classmethod
    def _preset_or_table(cls, value):
        if isinstance(value, str) and value not in PRESETS:
            raise ValueError(f"unknown thresholds preset {value!r}; use one of {', '.join(PRESETS)} "
                             "or a mapping {layer: threshold}")
        if isinstance(value, dict):
            bad = {k: v for k, v in value.items() if not 0.0 <= float(v) <= 1.0}
            if bad:
                raise ValueError(f"thresholds must be in [0, 1], got {bad}")
        return value


def merge_exit_config(default: ExitConfig, override: EarlyExitRequest | None) -> ExitConfig:
    """The request's ExitConfig: the deployment default with the fields the request set replaced.

    Changing the policy drops the default's policy-specific fields (``layer``, ``exit_layers``) unless the
    request sets them too. Raises pydantic ValidationError for invalid combinations.
    """
    if override is None:
        return default
    given = override.model_dump(exclude_none=True)
    if not given:
        return default
    base = default.model_dump(exclude_none=True, exclude_unset=True)  # unset fields stay unset: a preset fills them
    if "preset" in given:  # a preset request starts from the preset, not from the deployment default
        return ExitConfig.model_validate(given)
    if "policy" in given and given["policy"] != default.policy:
        base.pop("layer", None)
        base.pop("exit_layers", None)
    base.update(given)
    return ExitConfig.model_validate(base)


def exit_config_key(config: ExitConfig) -> str:
    """Requests with equal keys can share an engine batch (the engine takes one ExitConfig per batch)."""
    return config.model_dump_json(exclude_none=True)


class EarlyExitStats(BaseModel):
    """Response field ``early_exit``: where this response's tokens exited and what they cost."""

    policy: str
    kv: str
    num_layers: int = Field(description="Decoder layers of the model (the final layer).")
    mean_exit_layer: float | None = Field(None, description="Mean exit layer over generated tokens.")
    exit_layer_histogram: dict[str, int] = Field(default_factory=dict, description="Exit layer -> tokens.")
    flops: int = Field(0, description="Decode FLOPs spent (matmul FLOPs, multiply-add = 2).")
    flops_full: int = Field(0, description="Decode FLOPs the same tokens cost at full depth.")
    flops_saved_fraction: float = Field(0.0, description="1 - flops / flops_full (negative: early-exit checks cost "
                                        "more than they saved).")
    prefill_flops: int = Field(0, description="Prompt processing FLOPs (every layer, every policy).")
    batch_size: int = Field(1, description="Requests in the engine batch that generated this response.")
    thresholds: dict[str, float] | None = Field(None, description="Thresholds in force (confidence policy).")
    logprobs_from: str | None = Field(None, description="Where the returned log-probs come from (set when the "
                                      "request asked for logprobs): each token's exit layer, or the full-depth "
                                      "prefill for echoed prompt tokens.")


class ExitStatsAccumulator:
    """Collects per-token exit layers and FLOPs for one request."""

    def __init__(self, config: ExitConfig, num_layers: int, thresholds: dict[int, float] | None = None) -> None:
        self.config = config
        self.num_layers = num_layers
        self.thresholds = thresholds
        self.layers: list[int] = []
        self.flops = 0
        self.flops_full = 0
        self.prefill_flops = 0
        self.batch_size = 1
        self.logprobs_from: str | None = None

    def add(self, exit_layer: int, flops: int, flops_full: int) -> None:
        self.layers.append(int(exit_layer))
        self.flops += int(flops)
        self.flops_full += int(flops_full)

    def stats(self) -> EarlyExitStats:
        hist = Counter(self.layers)
        return EarlyExitStats(
            policy=self.config.policy,
            kv=self.config.kv,
            num_layers=self.num_layers,
            mean_exit_layer=round(sum(self.layers) / len(self.layers), 4) if self.layers else None,
            exit_layer_histogram={str(k): hist[k] for k in sorted(hist)},
            flops=self.flops,
            flops_full=self.flops_full,
            flops_saved_fraction=round(1.0 - self.flops / self.flops_full, 6) if self.flops_full else 0.0,
            prefill_flops=self.prefill_flops,
            batch_size=self.batch_size,
            thresholds={str(k): v for k, v in sorted(self.thresholds.items())} if self.thresholds else None,
            logprobs_from=self.logprobs_from,
        )

    @classmethod
    def merged(cls, parts: Sequence["ExitStatsAccumulator"]) -> "ExitStatsAccumulator":
        """One accumulator over several choices (the response-level ``early_exit`` of an ``n`` > 1 request)."""
        first = parts[0]
        out = cls(first.config, first.num_layers, first.thresholds)
        for p in parts:
            out.layers += p.layers
            out.flops += p.flops
            out.flops_full += p.flops_full
            out.prefill_flops += p.prefill_flops
        out.batch_size = max(p.batch_size for p in parts)
        out.logprobs_from = first.logprobs_from
        return out


# ------------------------------------------------------------------------------------------- requests

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs


def ValueError_at(field: str, message: str) -> ValueError:  # noqa: N802 - reads like the exception it builds
    """A model-level validation error that still names its field (``validation_error_to_api_error`` reads the
    ``field: message`` prefix)."""
    return ValueError(f"{_FIELD_MARK}{field}{_FIELD_MARK}{message}")


_FIELD_MARK = "\x1f"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    include_obfuscation: bool | None = None  # sent by newer clients; we never obfuscate


class _RequestBase(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, description="Most tokens to generate (>= 1, <= the server's limit).")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 is greedy.")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1, description="Choices per prompt, each decoded as its own row (at most the "
                          "server's max_choices).")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=0.0, le=0.0, description="Not supported (only 0).")
    frequency_penalty: float | None = Field(None, ge=0.0, le=0.0, description="Not supported (only 0).")
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    early_exit: EarlyExitRequest | None = None

    @field_validator("max_tokens")
    @classmethod
    def _positive(cls, value):
        if value is not None and value < 0:
            raise ValueError(f"max_tokens must be at least 1 (0 only with echo), got {value}")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value):
        if value:
            raise ValueError("logit_bias is not supported")
        return value

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_RequestBase):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = Field(False, description="Return the prompt before the completion (with its log-probs "
                              "from a full-depth prefill when logprobs is set); max_tokens 0 scores the prompt only.")
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="Log-probs of the chosen token plus "
                                 "this many most likely alternatives per position (from the token's exit layer).")
    best_of: int | None = Field(None, ge=1, le=1, description="Only 1.")
    suffix: str | None = Field(None, max_length=0, description="Not supported.")

    @field_validator("prompt")
    @classmethod
    def _some_prompt(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be empty")
        return value

    @model_validator(mode="after")
    def _zero_only_with_echo(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError_at("max_tokens", "max_tokens must be at least 1 (0 only with echo: true)")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts of this request: one string, one token list, or a list of either (one choice each)."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            return list(p)
        return [p]

    def single_prompt(self) -> str | list[int]:
        return self.prompts()[0]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"] = Field(description="Only plain text is supported.")


class ChatCompletionRequest(_RequestBase):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = Field(None, description="Return each output token's log-prob (from its exit layer).")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="Most likely alternatives per "
                                     "position, 0-20 (needs logprobs: true).")
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=0, description="Not supported.")
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None

    @field_validator("max_completion_tokens")
    @classmethod
    def _positive_completion(cls, value):
        if value is not None and value < 1:
            raise ValueError(f"max_completion_tokens must be at least 1, got {value}")
        return value

    @model_validator(mode="after")
    def _one_limit(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError_at("top_logprobs", "top_logprobs needs logprobs: true")
        if self.max_tokens == 0:
            raise ValueError_at("max_tokens", "max_tokens must be at least 1")
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ValueError("give max_tokens or max_completion_tokens, not two different values")
            self.max_tokens = self.max_completion_tokens
        return self

    def logprobs_k(self) -> int | None:
        """None: no log-probs; k >= 0: the chosen token's plus k alternatives."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def chat_messages(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


# ------------------------------------------------------------------------------------------ responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChunkExit(BaseModel):
    """Per-chunk extension: exit layers of the tokens whose text this chunk carries."""

    exit_layers: list[int]


class _Choice(BaseModel):
    index: int = 0
    logprobs: None = None
    finish_reason: str | None = None
    early_exit: EarlyExitStats | ChunkExit | None = Field(None, description="This choice's exit statistics (each "
                                                          "choice is decoded as its own row).")


class CompletionLogprobs(BaseModel):
    """The legacy completions ``logprobs`` object."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None
    refusal: None = None


class _Envelope(BaseModel):
    """What every completion response and stream chunk carries besides its choices."""

    id: str
    created: int
    model: str


class _Response(_Envelope):
    usage: Usage
    system_fingerprint: str | None = None
    early_exit: EarlyExitStats | None = None


class _Chunk(_Envelope):
    usage: Usage | None = None
    early_exit: EarlyExitStats | ChunkExit | None = None


class CompletionChoice(_Choice):
    text: str
    logprobs: CompletionLogprobs | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(_Choice):
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None


class CompletionResponse(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Choice):
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None


CompletionChunkChoice = CompletionChoice  # a streamed completion choice has the same fields


class ChatCompletionChunk(_Chunk):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class CompletionChunk(_Chunk):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChunkChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "layerexit"
    num_layers: int | None = None
    max_prompt_tokens: int | None = None
    max_tokens: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def sse(payload: BaseModel | dict) -> str:
    """One server-sent event line pair."""
    data = payload.model_dump_json(exclude_none=False) if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


# --------------------------------------------------------------------------------------- text streaming


class TextAssembler:
    """Turns generated token ids into text deltas, honouring stop strings.

    Text that might be the start of a stop string, or an incomplete UTF-8 character, is held back until it is
    resolved, so no client ever sees text past a stop string. ``exit_layers`` of the tokens whose text went out in a
    delta are reported with it.

    Decoding is incremental (``tokenizers``' ``DecodeStream``: each token decodes against a few tokens of context,
    O(1) per token) instead of re-decoding the whole answer per token (O(n^2) over an answer). The text equals
    ``tokenizer.decode(ids, skip_special_tokens=True)``; tokenizers without a ``tokenizers`` backend, or whose
    ``decode`` rewrites text afterwards (``clean_up_tokenization_spaces``), fall back to that full decode.
    """

    def __init__(self, tokenizer, stops: Iterable[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.layers: list[int] = []
        self.sent = 0  # characters of text already emitted
        self.sent_tokens = 0  # tokens whose text is fully emitted
        self.stopped = False
        self.text = ""
        self._decoded = ""  # everything the stream has decoded so far (complete characters only)
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._stream = None
        if self._backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(skip_special_tokens=True)

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _step(self, token_id: int) -> str:
        """The text of every token so far: incrementally, or (fallback) by decoding all of them again."""
        if self._stream is not None:
            try:
                piece = self._stream.step(self._backend, token_id)
            except Exception:  # noqa: BLE001 - e.g. an id the tokenizer has no token for: decode in full from now on
                self._stream = None
            else:
                if piece is not None:
                    self._decoded += piece
                return self._decoded
        return self._decode()

    def add(self, token_id: int, exit_layer: int = 0) -> tuple[str, list[int]]:
        """Add one token; return (new text safe to send, exit layers of the tokens it completes)."""
        if self.stopped:
            return "", []
        self.ids.append(int(token_id))
        self.layers.append(int(exit_layer))
        text = self._step(int(token_id))
        self.text = text
        for stop in self.stops:
            at = text.find(stop, max(0, self.sent - len(stop) + 1))
            if at != -1:
                self.stopped = True
                self.text = text[:at]
                return self._flush(at)
        safe = len(text) - self.hold
        if text.endswith("\ufffd"):
            safe = min(safe, len(text.rstrip("\ufffd")))
        if safe <= self.sent:
            return "", []
        return self._flush(safe)

    def _flush(self, upto: int) -> tuple[str, list[int]]:
        upto = max(upto, self.sent)
        delta = self.text[self.sent:upto]
        self.sent = upto
        layers = self.layers[self.sent_tokens:]
        self.sent_tokens = len(self.layers)
        return delta, layers

    def finish(self) -> tuple[str, list[int]]:
        """Everything still held back (generation ended)."""
        if not self.stopped:
            self.text = self.text.rstrip("\ufffd")
        return self._flush(len(self.text))
