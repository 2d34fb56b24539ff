"""Magpie-style training prompts: the chat model writes the user turns itself.

Given only its chat template up to the user header (``<|im_start|>user\\n`` after the default system turn on
SmolLM2), a chat model samples a plausible user request (Magpie, Xu et al. 2024); the model's own greedy answer to it
(``selfdistill.self_distill``) makes a training conversation. Both are the model's own text, so this is
self-distillation data that needs no dataset and does not run out.

Prompts are cached like the self-distilled answers, as JSONL under ``$LAYEREXIT_HOME/data/<model-id>/``; asking for
more later generates only the missing ones.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from layerexit.data.selfdistill import cache_path, write_jsonl_atomic

MAGPIE_CACHE_VERSION = 1
_MARK = "\x00LAYEREXIT_USER_TURN\x00"


def user_header_ids(tokenizer) -> list[int]:
    """Token ids of the chat template up to (and including) the user header: what the model continues with a
    user request. The template's default system turn, if any, is kept (it is what the model sees when serving)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("Magpie prompts need a chat template (the model writes the user turn after its header)")
    text = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], tokenize=False,
                                         add_generation_prompt=False)
    return list(tokenizer(text[: text.index(_MARK)], add_special_tokens=False)["input_ids"])


def _clean(text: str) -> str | None:
    text = text.strip()
    if len(text.split()) < 3 or len(text) > 2000:
        return None
    return text


def magpie_prompts(model_spec: str, n: int, *, temperature: float = 1.0, top_p: float = 0.95,
                   max_tokens: int = 64, batch_size: int = 32, seed: int = 0, show_progress: bool = True,
                   model_and_tokenizer=None) -> tuple[list[str], Path]:
    """``n`` distinct user requests sampled from the model after its user header (bf16, seeded per batch, cached).

    Returns the prompts and the cache file. Requests cut at ``max_tokens`` or shorter than 3 words are dropped.
    """
    import torch
    from tqdm.auto import tqdm

    from layerexit.engine.reference import eos_ids
    from layerexit.models.loading import load_model_and_tokenizer, resolve_model

    location = resolve_model(model_spec).location
    settings = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "batch_size": batch_size,
                "seed": seed, "dtype": "bfloat16"}
    path = cache_path(location, settings, prefix="magpie", version=MAGPIE_CACHE_VERSION)
    batches: dict[int, list[str]] = {}
    if path.is_file():
        try:
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    batches[int(row["batch"])] = list(row["prompts"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            batches = {}

    def collected() -> list[str]:
        seen, out = set(), []
        for b in sorted(batches):
            for p in batches[b]:
                if p not in seen:
                    seen.add(p)
                    out.append(p)
        return out

    if len(collected()) < n:
        model, tok = model_and_tokenizer or load_model_and_tokenizer(model_spec, dtype=torch.bfloat16)
        header = torch.tensor([user_header_ids(tok)], dtype=torch.long)
        eos = eos_ids(model, tok)
        bar = tqdm(total=n, desc="magpie prompts (base model)", disable=not show_progress)
        bar.update(min(len(collected()), n))
        b = max(batches, default=-1) + 1
        while len(collected()) < n:
            torch.manual_seed(seed * 1_000_003 + b)
            ids = header.expand(batch_size, -1)
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                     do_sample=True, temperature=temperature, top_p=top_p, top_k=None,
                                     pad_token_id=tok.pad_token_id, eos_token_id=sorted(eos) if eos else None,
                                     use_cache=True)
            kept = []
            for row in out[:, header.shape[1]:].tolist():
                if not any(t in eos for t in row):
                    continue  # cut at max_tokens: not a finished request
                text = _clean(tok.decode(row[: next(i for i, t in enumerate(row) if t in eos)],
                                         skip_special_tokens=True))
                if text is not None:
                    kept.append(text)
            before = len(collected())
            batches[b] = kept
            bar.update(max(0, min(len(collected()), n) - min(before, n)))
            b += 1
            write_jsonl_atomic(path, [{"batch": k, "prompts": v} for k, v in sorted(batches.items())])
        bar.close()
    return collected()[:n], path


def magpie_examples(model_spec: str, n: int, max_new_tokens: int, max_length: int, show_progress: bool = True,
                    model_and_tokenizer=None) -> tuple[list, dict]:
    """``n`` Magpie conversations (self-written request + the model's greedy answer) as training examples."""
    import time

    from layerexit.data.datasets import TokenizeStats, finish_example
    from layerexit.data.instructions import Instruction
    from layerexit.data.selfdistill import self_distill

    t0 = time.time()
    prompts, prompt_cache = magpie_prompts(model_spec, n, show_progress=show_progress,
                                           model_and_tokenizer=model_and_tokenizer)
    t1 = time.time()
    items: Sequence[Instruction] = [Instruction(f"magpie-{i}", "magpie", p) for i, p in enumerate(prompts)]
    answers, answer_cache = self_distill(model_spec, items, max_new_tokens, show_progress=show_progress,
                                         model_and_tokenizer=model_and_tokenizer)
    stats = TokenizeStats()
    examples = []
    for a in answers:
        ex = finish_example([*a.prompt_ids, *a.response_ids], [-100] * len(a.prompt_ids) + list(a.response_ids),
                            len(a.prompt_ids), max_length, stats)
        if ex is not None:
            examples.append(ex)
    meta = {"prompts": len(prompts), "examples": len(examples), "prompt_cache": str(prompt_cache),
            "answer_cache": str(answer_cache), "prompts_s": round(t1 - t0, 1), "answers_s": round(time.time() - t1, 1),
            **{f"tokens_{k}": v for k, v in stats.as_dict().items()}}
    return examples, meta
