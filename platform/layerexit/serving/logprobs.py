"""OpenAI ``logprobs`` shapes from token ids and log-probs (pure functions over a tokenizer, no model).

Generated tokens carry the log-prob the engine computed at the layer each token exited at; echoed prompt
tokens carry the log-prob from a full-depth prefill (``engine/scoring.py``). The first prompt token has no
log-prob (nothing precedes it), which OpenAI writes as ``null``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from layerexit.serving.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob


@dataclass
class TokenScores:
    """Per-token ids, log-probs and top alternatives, in order (a prompt's echo or a choice's output)."""

    ids: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    top: list[list[tuple[int, float]] | None] = field(default_factory=list)

    def add(self, token_id: int, logprob: float | None, top: Sequence[tuple[int, float]] | None) -> None:
        self.ids.append(int(token_id))
        self.logprobs.append(None if logprob is None else float(logprob))
        self.top.append(None if top is None else [(int(t), float(v)) for t, v in top])

    def slice(self, start: int, stop: int | None = None) -> "TokenScores":
        return TokenScores(self.ids[start:stop], self.logprobs[start:stop], self.top[start:stop])

    def __len__(self) -> int:
        return len(self.ids)


def token_text(tokenizer, token_id: int) -> str:
    """A token's own text (as OpenAI lists it; a byte fragment of a multi-byte character decodes to U+FFFD)."""
    return tokenizer.decode([int(token_id)], skip_special_tokens=False)


def _top_dict(tokenizer, top: list[tuple[int, float]] | None, k: int) -> dict[str, float] | None:
    if top is None:
        return None
    out: dict[str, float] = {}
    for tid, lp in top[:k]:
        text = token_text(tokenizer, tid)
        out.setdefault(text, lp)  # two ids with the same text: keep the likelier (listed first)
    return out


def completion_logprobs(tokenizer, scores: TokenScores, k: int, text_offset0: int = 0) -> CompletionLogprobs:
    """The legacy completions object: ``tokens``, ``token_logprobs``, ``top_logprobs`` (k alternatives per
    position, at least the chosen token's own entry as OpenAI returns it) and ``text_offset``."""
    tokens = [token_text(tokenizer, t) for t in scores.ids]
    offsets, pos = [], text_offset0
    for text in tokens:
        offsets.append(pos)
        pos += len(text)
    tops: list[dict[str, float] | None] = []
    for tid, lp, top in zip(scores.ids, scores.logprobs, scores.top):
        if lp is None:
            tops.append(None)
            continue
        entry = _top_dict(tokenizer, top, k) or {}
        if k == 0 or not entry:
            entry = {token_text(tokenizer, tid): lp}
        tops.append(entry)
    return CompletionLogprobs(tokens=tokens, token_logprobs=list(scores.logprobs), top_logprobs=tops,
                              text_offset=offsets)


def chat_logprobs(tokenizer, scores: TokenScores, k: int) -> ChatLogprobs:
    """The chat object: ``content`` = one entry per output token with ``top_logprobs`` (k alternatives)."""
    content = []
    for tid, lp, top in zip(scores.ids, scores.logprobs, scores.top):
        text = token_text(tokenizer, tid)
        alternatives = [TopLogprob(token=token_text(tokenizer, t), logprob=v,
                                   bytes=list(token_text(tokenizer, t).encode("utf-8"))) for t, v in (top or [])[:k]]
        content.append(TokenLogprob(token=text, logprob=lp if lp is not None else 0.0,
                                    bytes=list(text.encode("utf-8")), top_logprobs=alternatives))
    return ChatLogprobs(content=content)
