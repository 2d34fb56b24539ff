"""Self-distilled training data: the base model's own greedy answers to the instruction set.

Training the exits on what the final layer already says teaches them to match it while the final layer keeps its
behaviour. Generation is slow on CPU, so results are cached as JSONL under
``$LAYEREXIT_HOME/data/<model-id>/selfdistill-<key>.jsonl``; the key covers the model (location and weight files),
the instructions and every generation setting, so a change in any of them regenerates.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from layerexit.data.instructions import Instruction
from layerexit.data.prompts import format_prompt
from layerexit.home import layerexit_home

CACHE_VERSION = 1


@dataclass
class DistilledExample:
    """One instruction with the base model's greedy response (token ids are what training uses)."""

    id: str
    category: str
    prompt: str
    prompt_ids: list[int]
    response_ids: list[int]
    response: str

    @property
    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.response}]


def model_fingerprint(location: str) -> dict:
    """Identify a model by where it lives and its weight files' sizes and mtimes (cheap, no hashing of weights)."""
    path = Path(location)
    if not path.is_dir():
        return {"location": location}
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    return {"location": str(path.resolve()),
            "files": [[p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in files]}


def model_id(location: str) -> str:
    """A filesystem-safe short name for the cache directory."""
    name = Path(location.rstrip("/")).name or location
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:80]


def cache_path(location: str, instructions: Sequence[Instruction], settings: dict) -> Path:
    key_src = json.dumps({"v": CACHE_VERSION, "model": model_fingerprint(location),
                          "instructions": [[i.id, i.text] for i in instructions], "settings": settings},
                         sort_keys=True)
    key = hashlib.sha1(key_src.encode()).hexdigest()[:16]
    return layerexit_home() / "data" / model_id(location) / f"selfdistill-{key}.jsonl"


def read_cache(path: Path) -> list[DistilledExample] | None:
    if not path.is_file():
        return None
    try:
        return [DistilledExample(**json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines() if line]
    except (json.JSONDecodeError, TypeError):
        return None  # a foreign or damaged file: regenerate


def write_jsonl_atomic(path: Path, rows: Sequence[dict]) -> Path:
    """Write JSONL to a temp file in the same directory and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def self_distill(
    model_spec: str,
    instructions: Sequence[Instruction],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    show_progress: bool = True,
    model_and_tokenizer=None,
    use_cache: bool = True,
) -> tuple[list[DistilledExample], Path]:
    """Greedy final-layer responses of ``model_spec`` to ``instructions``, from the cache when present.

    Returns the examples (in the order of ``instructions``) and the cache file path.
    """
    from layerexit.engine.reference import eos_ids, hf_greedy_generate_batched
    from layerexit.models.loading import load_model_and_tokenizer, resolve_model

    location = resolve_model(model_spec).location
    settings = {"max_new_tokens": max_new_tokens, "decoding": "greedy", "dtype": "float32", "template": "chat"}
    path = cache_path(location, instructions, settings)
    if use_cache:
        cached = read_cache(path)
        if cached is not None and [c.id for c in cached] == [i.id for i in instructions]:
            return cached, path
    model, tokenizer = model_and_tokenizer or load_model_and_tokenizer(model_spec)
    prompt_ids = [format_prompt(tokenizer, i.text) for i in instructions]
    responses = hf_greedy_generate_batched(
        model, prompt_ids, max_new_tokens, tokenizer.pad_token_id, batch_size=batch_size,
        eos=eos_ids(model, tokenizer), show_progress=show_progress, desc="self-distill (base model answers)",
    )
    examples = [
        DistilledExample(i.id, i.category, i.text, p, r, tokenizer.decode(r, skip_special_tokens=True))
        for i, p, r in zip(instructions, prompt_ids, responses, strict=True)
    ]
    write_jsonl_atomic(path, [asdict(e) for e in examples])
    return examples, path
