"""Ways to turn an exit's hidden state into token scores, each with its exact price in FLOPs.

- ``FullHead``: the model's final norm + LM head over the whole vocabulary (2 * H * V FLOPs per position).
- ``CandidateHead``: only K rows of the head, a different set per row (dynamic vocabulary pruning, arXiv
  2410.18952): the first check of a token computes full logits once and keeps its top-K; later checks and the
  exit token use those K rows (2 * H * K FLOPs per position).
- ``StaticVocabHead``: a fixed subset of N rows for every position (FR-Spec / VocabTrim draft heads): the N
  tokens the model emits most, measured on the training split. Used for drafting (verification by the full head
  keeps self-speculative decoding lossless) and as a cheap exit check (``check_head: static``): the exit decision
  is scored over the N rows (2 * H * N FLOPs per check) and a row that exits takes its token from the full head
  at its exit layer, so the token is exactly the full head's argmax there whatever the subset holds; a row that
  does not exit pays only the N rows.

Every head goes through the exit's adapter first (``exit_hidden``), so models with exit adapters work unchanged.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from layerexit.errors import ConfigError
from layerexit.models.exits import DecoderParts, exit_hidden


def adapter_flops(parts: DecoderParts, layer: int, positions: int) -> int:
    """FLOPs of the exit adapter at ``layer`` for ``positions`` positions (0 without an adapter)."""
    adapter = parts.adapters.get(layer)
    cost = getattr(adapter, "flops", None) if adapter is not None else None
    return int(cost(positions)) if cost is not None else 0


def normed_exit(parts: DecoderParts, layer: int, h: torch.Tensor) -> torch.Tensor:
    """The final-normed exit hidden state (through the layer's adapter when it has one)."""
    return parts.norm(exit_hidden(parts, layer, h))


class FullHead:
    """The whole LM head."""

    def __init__(self, parts: DecoderParts) -> None:
        self.parts = parts
        self.vocab = parts.head.weight.shape[0]
        self.hidden = parts.head.weight.shape[1]

    def logits(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        # Shape: h (n, H) -> logits (n, V), float32
        return self.parts.head(normed_exit(self.parts, layer, h)).float()

    def flops(self, positions: int, layer: int) -> int:
        return 2 * self.hidden * self.vocab * positions + adapter_flops(self.parts, layer, positions)


class CandidateHead:
    """K rows of the LM head per row: ``candidates`` (n, K) token ids, scored by a batched matrix product."""

    def __init__(self, parts: DecoderParts) -> None:
        self.parts = parts
        self.hidden = parts.head.weight.shape[1]

    def logits(self, h: torch.Tensor, layer: int, candidates: torch.Tensor) -> torch.Tensor:
        # Shape: h (n, H), candidates (n, K) -> logits (n, K), float32
        x = normed_exit(self.parts, layer, h)
        rows = self.parts.head.weight[candidates]  # Shape: (n, K, H)
        out = torch.bmm(rows, x[:, :, None]).squeeze(-1)
        bias = getattr(self.parts.head, "bias", None)
        if bias is not None:
            out = out + bias[candidates]
        return out.float()

    def flops(self, positions: int, k: int, layer: int) -> int:
        return 2 * self.hidden * k * positions + adapter_flops(self.parts, layer, positions)


class StaticVocabHead:
    """A fixed subset of the head's rows (a draft vocabulary); scores map back to full token ids."""

    def __init__(self, parts: DecoderParts, token_ids: Sequence[int]) -> None:
        vocab = parts.head.weight.shape[0]
        ids = sorted(set(int(t) for t in token_ids))
        if not ids or ids[0] < 0 or ids[-1] >= vocab:
            raise ConfigError(f"draft vocabulary ids must lie in 0..{vocab - 1}", "rebuild it for this model")
        self.parts = parts
        self.ids = torch.tensor(ids, dtype=torch.long, device=parts.head.weight.device)
        self.weight = parts.head.weight[self.ids].contiguous()  # Shape: (N, H), a copy made once
        self.hidden = self.weight.shape[1]

    def logits(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        # Shape: h (n, H) -> logits (n, N) over ``self.ids``, float32
        return self.scores(normed_exit(self.parts, layer, h))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over ``self.ids`` of already final-normed exit states (Shape: x (n, H) -> (n, N), float32)."""
        return (x @ self.weight.T).float()

    def flops(self, positions: int, layer: int) -> int:
        return 2 * self.hidden * len(self.ids) * positions + adapter_flops(self.parts, layer, positions)


def load_check_vocab(path: str | Path, size: int, vocab: int, tokenizer=None) -> list[int]:
    """The first ``size`` ids (most frequent first) of a static check vocabulary file, checked against the model:
    ConfigError naming ``check_vocab`` (size outside 1..vocab, or more than the file holds) or
    ``check_vocab_file`` (missing, not a vocabulary file, made for another tokenizer or vocabulary size)."""
    if not 1 <= int(size) <= vocab:
        raise ConfigError(f"check_vocab {size} is outside 1..{vocab} (this model's vocabulary)",
                          f"use a static check vocabulary of 1..{vocab} ids")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"check_vocab_file {path} does not exist",
                          "build one with `python -m layerexit.data.draft_vocab`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"check_vocab_file {path} is not JSON ({err})", "rebuild it") from err
    if not isinstance(data, dict) or data.get("format") != "layerexit-draft-vocab/1":
        raise ConfigError(f"check_vocab_file {path} is not a vocabulary file",
                          "build one with `python -m layerexit.data.draft_vocab`")
    if tokenizer is not None and data.get("tokenizer") != tokenizer_fingerprint(tokenizer):
        raise ConfigError(f"check_vocab_file {path} was built for another tokenizer",
                          "rebuild it for this model with `python -m layerexit.data.draft_vocab`")
    if data.get("vocab_size", vocab) != vocab:
        raise ConfigError(f"check_vocab_file {path} was built for another tokenizer ({data['vocab_size']} tokens; "
                          f"this model has {vocab})", "rebuild it for this model with "
                          "`python -m layerexit.data.draft_vocab`")
    ids = [int(t) for t in data.get("token_ids", [])]
    if int(size) > len(ids):
        raise ConfigError(f"check_vocab {size} is more than check_vocab_file {path} holds ({len(ids)} ids)",
                          f"use check_vocab <= {len(ids)} or build a larger file")
    if any(not 0 <= t < vocab for t in ids[: int(size)]):
        raise ConfigError(f"check_vocab_file {path} holds ids outside 0..{vocab - 1}", "rebuild it for this model")
    return ids[: int(size)]


def check_vocab_size(check_vocab: int | str, vocab: int) -> int | None:
    """The candidate-set size K for ``check_vocab`` on a ``vocab``-token model (None = full head)."""
    if check_vocab == "full":
        return None
    k = int(check_vocab)
    if not 1 <= k <= vocab:
        raise ConfigError(f"check_vocab {k} is outside 1..{vocab} (this model's vocabulary)",
                          f"use an integer K in 1..{vocab} or \"full\"")
    return k


# ------------------------------------------------------------------------------------------ draft vocabulary
def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the tokenizer's vocabulary (token -> id), so a draft vocabulary is not used with another."""
    vocab = tokenizer.get_vocab()
    blob = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def build_draft_vocab(token_streams: Iterable[Sequence[int]], size: int) -> list[int]:
    """The ``size`` most frequent token ids in ``token_streams`` (the model's own responses on the training split)."""
    counts: Counter[int] = Counter()
    for seq in token_streams:
        counts.update(int(t) for t in seq)
    if not counts:
        raise ValueError("no tokens to count: generate responses first")
    return [tok for tok, _ in counts.most_common(size)]


def save_draft_vocab(path: str | Path, token_ids: Sequence[int], tokenizer) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": "layerexit-draft-vocab/1", "tokenizer": tokenizer_fingerprint(tokenizer),
                                "vocab_size": len(tokenizer), "token_ids": [int(t) for t in token_ids]}))
    return path


def load_draft_vocab(path: str | Path, tokenizer=None, vocab_size: int | None = None) -> list[int]:
    """Token ids of a draft vocabulary file; rejects a file made for another tokenizer (when one is given)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"draft_vocab file {path} does not exist",
                          "build one with `python -m layerexit.data.draft_vocab`")
    data = json.loads(path.read_text())
    if data.get("format") != "layerexit-draft-vocab/1":
        raise ConfigError(f"draft_vocab {path} is not a draft vocabulary file",
                          "build one with `python -m layerexit.data.draft_vocab`")
    if tokenizer is not None and data.get("tokenizer") != tokenizer_fingerprint(tokenizer):
        raise ConfigError(f"draft_vocab {path} was built for another tokenizer",
                          "rebuild it with `python -m layerexit.data.draft_vocab`")
    if vocab_size is not None and data.get("vocab_size", vocab_size) > vocab_size:
        raise ConfigError(f"draft_vocab {path} was built for a {data['vocab_size']}-token vocabulary, "
                          f"this model has {vocab_size}", "rebuild it with `python -m layerexit.data.draft_vocab`")
    return [int(t) for t in data["token_ids"]]
