"""The project's own instruction set (``resources/instructions.jsonl``) and its fixed 80/20 train/held-out split.

Each line is ``{"id", "category", "prompt"[, "input"]}``. The split is stratified by category: within each
category, instructions are ordered by a hash of their id and the first round(20%) are held out. It never depends on
file order, every category is represented in both parts, and the held-out share is exactly 20% per category.
The held-out 20% are the default evaluation prompts (alignment, quality) and are never trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from layerexit.data.prompts import builtin_prompts_path, iter_prompt_objects
from layerexit.errors import InputFileError

HELDOUT_FRACTION = 0.2
_SPLIT_SALT = "layerexit-heldout-v1"


@dataclass(frozen=True)
class Instruction:
    """One instruction; ``text`` is what the user turn holds (prompt plus its input, if any)."""

    id: str
    category: str
    prompt: str
    input: str | None = None

    @property
    def text(self) -> str:
        return f"{self.prompt}\n\n{self.input}" if self.input else self.prompt


def instructions_path() -> Path:
    """The instruction set shipped inside the package."""
    return builtin_prompts_path("instructions.jsonl")


def load_instructions(path: str | Path | None = None) -> list[Instruction]:
    """Read an instruction JSONL file (default: the built-in set); errors name the line."""
    path = Path(path) if path is not None else instructions_path()
    if not path.is_file():
        raise InputFileError(f"instruction file not found: {path}",
                             'pass a JSONL file with one {"id", "category", "prompt"} object per line')
    items: list[Instruction] = []
    seen: set[str] = set()
    fix = 'each line must look like {"id": ..., "category": ..., "prompt": "..."}'
    for lineno, obj in iter_prompt_objects(path, fix):
        ident = str(obj.get("id", f"line-{lineno}"))
        if ident in seen:
            raise InputFileError(f"{path}:{lineno}: duplicate id {ident!r}", "give every instruction its own id")
        seen.add(ident)
        extra = obj.get("input")
        items.append(Instruction(ident, str(obj.get("category", "general")), obj["prompt"].strip(),
                                 extra.strip() if isinstance(extra, str) and extra.strip() else None))
    if not items:
        raise InputFileError(f"instruction file {path} holds no instructions", 'add lines like {"id": 1, "prompt": "..."}')
    return items


def _hash_rank(ident: str) -> int:
    return int.from_bytes(hashlib.sha1(f"{_SPLIT_SALT}:{ident}".encode()).digest()[:8], "big")


def split_instructions(
    items: Sequence[Instruction], fraction: float = HELDOUT_FRACTION
) -> tuple[list[Instruction], list[Instruction]]:
    """(train, held-out): per category, the round(fraction * n) instructions with the smallest id hash are held
    out. Both lists keep the file order."""
    by_cat: dict[str, list[Instruction]] = {}
    for item in items:
        by_cat.setdefault(item.category, []).append(item)
    held_ids: set[str] = set()
    for group in by_cat.values():
        ranked = sorted(group, key=lambda i: _hash_rank(i.id))
        held_ids.update(i.id for i in ranked[: round(fraction * len(group))])
    train = [i for i in items if i.id not in held_ids]
    held = [i for i in items if i.id in held_ids]
    return train, held


def interleave_categories(items: Sequence[Instruction]) -> list[Instruction]:
    """Round-robin over categories (first of each, then second of each...), so any prefix is balanced."""
    by_cat: dict[str, list[Instruction]] = {}
    for item in items:
        by_cat.setdefault(item.category, []).append(item)
    out: list[Instruction] = []
    for i in range(max((len(g) for g in by_cat.values()), default=0)):
        out.extend(g[i] for g in by_cat.values() if i < len(g))
    return out


def train_instructions(path: str | Path | None = None) -> list[Instruction]:
    """The ~80% of the instruction set used for training."""
    return split_instructions(load_instructions(path))[0]


def heldout_instructions(path: str | Path | None = None) -> list[Instruction]:
    """The ~20% kept out of training: the default evaluation prompts."""
    return split_instructions(load_instructions(path))[1]


def write_prompt_file(items: Iterable[Instruction], path: str | Path) -> Path:
    """Write instructions as a prompt file (``{"prompt", "id", "category"}`` per line), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for item in items:
                fh.write(json.dumps({"prompt": item.text, "id": item.id, "category": item.category}) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_heldout_prompts(path: str | Path, source: str | Path | None = None) -> Path:
    """Write the held-out instructions as a JSONL prompt file usable by ``layerexit alignment --prompts``."""
    return write_prompt_file(heldout_instructions(source), path)
