"""Self-distilled training data: the base model's own greedy answers to the instruction set.

Training the exits on what the final layer already says teaches them to match it while the final layer keeps its
behaviour. Generation is slow on CPU, so results are cached as JSONL under
``$LAYEREXIT_HOME/data/<model-id>/selfdistill-<key>.jsonl``. The key covers the model (location and weight files)
and every generation setting; rows are keyed by instruction id and text, so only new or edited instructions are
generated on a later call.
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


def text_key(item: Instruction) -> str:
    return hashlib.sha1(item.text.encode()).hexdigest()[:12]


def cache_path(location: str, settings: dict, prefix: str = "selfdistill", version: int = CACHE_VERSION) -> Path:
    """One cache file per model and generation settings; rows are keyed by instruction id and text."""
    key_src = json.dumps({"v": version, "model": model_fingerprint(location), "settings": settings}, sort_keys=True)
    key = hashlib.sha1(key_src.encode()).hexdigest()[:16]
    return layerexit_home() / "data" / model_id(location) / f"{prefix}-{key}.jsonl"


def read_cache(path: Path, row_type: type[DistilledExample] = DistilledExample) -> dict[tuple, DistilledExample]:
    """Cached rows by (id, text key), plus the sample number for sampled answers; a damaged file counts as empty
    (it is regenerated)."""
    if not path.is_file():
        return {}
    rows: dict[tuple, DistilledExample] = {}
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                obj = json.loads(line)
                key = obj.pop("text_key")
                ex = row_type(**obj)
                rows[(ex.id, key, ex.sample) if isinstance(ex, SampledExample) else (ex.id, key)] = ex
    except (json.JSONDecodeError, TypeError, KeyError):
        return {}
    return rows


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
    """Greedy final-layer responses of ``model_spec`` to ``instructions``; only instructions missing from the
    cache are generated (then the cache is rewritten atomically).

    Returns the examples (in the order of ``instructions``) and the cache file path.
    """
    from layerexit.engine.reference import eos_ids, hf_greedy_generate_batched
    from layerexit.models.loading import load_model_and_tokenizer, resolve_model

    location = resolve_model(model_spec).location
    settings = {"max_new_tokens": max_new_tokens, "decoding": "greedy", "dtype": "float32", "template": "chat"}
    path = cache_path(location, settings)
    cached = read_cache(path) if use_cache else {}
    missing = [i for i in instructions if (i.id, text_key(i)) not in cached]
    if missing:
        model, tokenizer = model_and_tokenizer or load_model_and_tokenizer(model_spec)
        prompt_ids = [format_prompt(tokenizer, i.text) for i in missing]
        responses = hf_greedy_generate_batched(
            model, prompt_ids, max_new_tokens, tokenizer.pad_token_id, batch_size=batch_size,
            eos=eos_ids(model, tokenizer), show_progress=show_progress, desc="self-distill (base model answers)",
        )
        for i, p, r in zip(missing, prompt_ids, responses, strict=True):
            cached[(i.id, text_key(i))] = DistilledExample(
                i.id, i.category, i.text, p, r, tokenizer.decode(r, skip_special_tokens=True))
        write_jsonl_atomic(path, [{**asdict(ex), "text_key": key[1]} for key, ex in cached.items()])
    return [cached[(i.id, text_key(i))] for i in instructions], path


# ----------------------------------------------------------------------------------------------- sampled answers

SAMPLE_CACHE_VERSION = 1


@dataclass
class SampledExample(DistilledExample):
    """One sampled (temperature > 0) answer of the base model; ``sample`` numbers the answers of one instruction."""

    sample: int = 0


def sample_responses(
    model_spec: str,
    instructions: Sequence[Instruction],
    num_samples: int = 3,
    temperature: float = 0.8,
    top_p: float = 0.95,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    seed: int = 0,
    show_progress: bool = True,
    model_and_tokenizer=None,
) -> tuple[list[SampledExample], Path]:
    """``num_samples`` sampled answers per instruction (bf16, seeded per batch), cached like ``self_distill``.

    More distinct answers per instruction is more training data that does not run out: the exits see the
    base model's distribution around its greedy path, not one path memorised. Only pass training instructions.
    """
    import torch
    from tqdm.auto import tqdm

    from layerexit.engine.reference import eos_ids, pad_left
    from layerexit.models.loading import load_model_and_tokenizer, resolve_model

    if num_samples < 1:
        return [], Path()
    if not temperature > 0:
        raise ValueError("sampling temperature must be > 0")
    location = resolve_model(model_spec).location
    settings = {"max_new_tokens": max_new_tokens, "decoding": "sample", "temperature": temperature, "top_p": top_p,
                "num_samples": num_samples, "seed": seed, "dtype": "bfloat16", "template": "chat"}
    path = cache_path(location, settings, prefix="samples", version=SAMPLE_CACHE_VERSION)
    cached = read_cache(path, SampledExample)
    missing = [i for i in instructions if any((i.id, text_key(i), s) not in cached for s in range(num_samples))]
    if missing:
        model, tokenizer = model_and_tokenizer or load_model_and_tokenizer(model_spec, dtype=torch.bfloat16)
        eos = eos_ids(model, tokenizer)
        order = sorted(missing, key=lambda i: len(i.text))
        batches = [order[j : j + batch_size] for j in range(0, len(order), batch_size)]
        for b, batch in enumerate(tqdm(batches, desc="sample answers (base model)", disable=not show_progress)):
            prompts = [format_prompt(tokenizer, i.text) for i in batch]
            ids, mask = pad_left(prompts, tokenizer.pad_token_id)
            torch.manual_seed(seed * 1_000_003 + b)
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     do_sample=True, temperature=temperature, top_p=top_p, top_k=None,
                                     num_return_sequences=num_samples, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=sorted(eos) if eos else None, use_cache=True)
            rows = out[:, ids.shape[1]:].tolist()
            for j, item in enumerate(batch):
                for s in range(num_samples):
                    kept: list[int] = []
                    for tok in rows[j * num_samples + s]:
                        kept.append(tok)
                        if tok in eos:
                            break
                    cached[(item.id, text_key(item), s)] = SampledExample(
                        item.id, item.category, item.text, prompts[j], kept,
                        tokenizer.decode(kept, skip_special_tokens=True), s)
        write_jsonl_atomic(path, [{**asdict(ex), "text_key": key[1]} for key, ex in cached.items()])
    return [cached[(i.id, text_key(i), s)] for i in instructions for s in range(num_samples)], path
