"""Prompt files (JSONL, one object per line with a ``prompt`` field) and turning prompts into token ids."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from layerexit.errors import InputFileError


@dataclass
class Prompt:
    """One prompt and whatever else its line carried (``category``, ``id``...)."""

    prompt: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def category(self) -> str | None:
        return self.extra.get("category")


def builtin_prompts_path(name: str = "demo_prompts.jsonl") -> Path:
    """Path of a prompt file shipped inside the package."""
    return Path(str(resources.files("layerexit.data") / "resources" / name))


def iter_prompt_objects(path: Path, line_fix: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank JSONL line holding a non-empty string ``prompt``; errors name
    the line, and ``line_fix`` says what a line should look like."""
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputFileError(f"{path}:{lineno}: malformed JSON ({err.msg})", "fix or remove that line") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
                raise InputFileError(f"{path}:{lineno}: no non-empty string field 'prompt'", line_fix)
            yield lineno, obj


def read_prompts(path: str | Path, limit: int | None = None) -> list[Prompt]:
    """Read a JSONL prompt file; errors name the line and the fix."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"prompt file not found: {path}", "pass a JSONL file with one {\"prompt\": ...} per line")
    prompts: list[Prompt] = []
    for _lineno, obj in iter_prompt_objects(path, 'each line must look like {"prompt": "..."}'):
        text = obj.pop("prompt")
        prompts.append(Prompt(text, obj))
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise InputFileError(f"prompt file {path} holds no prompts", "add lines like {\"prompt\": \"...\"}")
    return prompts


def format_prompt(tokenizer, text: str, use_chat_template: bool = True) -> list[int]:
    """Token ids for a user instruction: the model's chat template when it has one, else the raw text."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(text, add_special_tokens=True)["input_ids"]
