"""What the engine yields and returns per sequence (token events, sequence results) and the continuous-batching
hook a caller passes in. Plain data: the decode loop (``engine/loop.py``) fills them, ``engine/decode.py``
re-exports them as the engine's public result types."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from layerexit.engine.options import SamplingParams


@dataclass
class TokenEvent:
    """One generated token of one sequence, as the stream yields it."""

    index: int  # position of the sequence in the caller's prompt list
    token_id: int
    exit_layer: int
    confidence: float
    flops: int  # FLOPs spent producing this token
    flops_full: int  # what the same token costs at full depth (same KV strategy)
    finished: bool = False
    finish_reason: str | None = None  # "stop" (EOS / stop id) or "length"
    # Only when the row's SamplingParams.logprobs is set: log-softmax of the chosen token under the full-vocabulary
    # distribution of the layer the token was taken from (self-speculative: the verifying final layer), and the
    # top-k (token id, logprob) pairs of that distribution.
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    # Self-speculative, on the first token of each verification step: drafts verified, and how many were accepted.
    drafted: int = 0
    accepted: int = 0


@dataclass
class SequenceResult:
    """Everything about one generated sequence."""

    token_ids: list[int] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    flops: int = 0
    flops_full: int = 0
    prefill_flops: int = 0
    seconds: float = 0.0
    finish_reason: str | None = None
    logprobs: list[float] = field(default_factory=list)  # filled when SamplingParams.logprobs is set
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # Self-speculative: drafted_at[i] = verification steps that drafted a token at draft position i+1,
    # accepted_at[i] = steps that accepted it (acceptance at position i+1 = accepted_at[i] / drafted_at[0], vLLM's).
    drafted_at: list[int] = field(default_factory=list)
    accepted_at: list[int] = field(default_factory=list)

    def count_draft(self, drafted: int, accepted: int) -> None:
        """One verification step that drafted ``drafted`` tokens and accepted the first ``accepted``."""
        grow = drafted - len(self.drafted_at)
        if grow > 0:
            self.drafted_at.extend([0] * grow)
            self.accepted_at.extend([0] * grow)
        for i in range(drafted):
            self.drafted_at[i] += 1
            self.accepted_at[i] += int(i < accepted)

    def to_dict(self) -> dict:
        return asdict(self)


class BatchJoiner(Protocol):
    """What a caller gives ``EarlyExitEngine.stream`` for continuous batching; called between steps."""

    def admit(self, max_prompt_len: int, rows: int) -> list[tuple[Sequence[int], SamplingParams]]:
        """New (prompt ids, sampling) rows to add now, each prompt at most ``max_prompt_len`` tokens;
        ``rows`` is how many rows the batch holds."""
        ...

    def cancelled(self, index: int) -> bool:
        """Whether the caller no longer wants the row with this index (it leaves the batch)."""
        ...
