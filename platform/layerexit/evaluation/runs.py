"""End-to-end analyses that load a model and prompts and return a report (what CLI commands and jobs call)."""

from __future__ import annotations

from pathlib import Path

from layerexit.data.prompts import format_prompt, read_prompts
from layerexit.engine.reference import eos_ids, hf_greedy_generate_batched
from layerexit.evaluation.alignment import AlignmentReport, alignment_from_generations
from layerexit.models.loading import load_model_and_tokenizer


def run_alignment(
    model_spec: str,
    prompts_path: str | Path,
    max_new_tokens: int = 64,
    limit: int | None = None,
    batch_size: int = 8,
    show_progress: bool = True,
    model_and_tokenizer=None,
) -> AlignmentReport:
    """Generate greedily from the final layer, then measure every layer's alignment on those tokens."""
    prompts = read_prompts(prompts_path, limit=limit)  # validate the file before loading a model
    model, tokenizer = model_and_tokenizer or load_model_and_tokenizer(model_spec)
    prompt_ids = [format_prompt(tokenizer, p.prompt) for p in prompts]
    responses = hf_greedy_generate_batched(
        model, prompt_ids, max_new_tokens, tokenizer.pad_token_id, batch_size=batch_size,
        eos=eos_ids(model, tokenizer), show_progress=show_progress,
    )
    return alignment_from_generations(model, prompt_ids, responses, show_progress=show_progress)
