"""The `make demo` pipeline on the embedded SmolLM2 (CPU). Each stage prints what a user should look at.

Stage 1 (foundation): answers from the final layer and the per-layer alignment table of the untuned model.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.panel import Panel

from layerexit.data.prompts import builtin_prompts_path, format_prompt, read_prompts
from layerexit.engine.reference import eos_ids, hf_greedy_generate_batched
from layerexit.evaluation.alignment import alignment_from_generations, plot_alignment
from layerexit.evaluation.tables import alignment_table
from layerexit.models.loading import load_model_and_tokenizer


def run_demo(model_spec: str = "smollm2", max_new_tokens: int = 64, answers: int = 3, out_dir: str = "outputs/demo") -> dict:
    """Run the demo stages and return the numbers they printed."""
    console = Console()
    t0 = time.time()
    console.rule(f"layerexit demo: {model_spec}")
    model, tokenizer = load_model_and_tokenizer(model_spec)
    console.print(f"loaded {type(model).__name__}: {model.config.num_hidden_layers} layers, "
                  f"hidden {model.config.hidden_size}, vocab {model.config.vocab_size}")

    prompts = read_prompts(builtin_prompts_path())
    prompt_ids = [format_prompt(tokenizer, p.prompt) for p in prompts]
    responses = hf_greedy_generate_batched(
        model, prompt_ids, max_new_tokens, tokenizer.pad_token_id, batch_size=4, eos=eos_ids(model, tokenizer)
    )
    console.rule("1. Answers from the final layer (greedy, KV cache)")
    for p, r in list(zip(prompts, responses, strict=True))[:answers]:
        console.print(Panel(tokenizer.decode(r, skip_special_tokens=True).strip(), title=p.prompt, title_align="left"))

    console.rule("2. Per-layer alignment with the final layer (before LITE)")
    report = alignment_from_generations(model, prompt_ids, responses)
    console.print(alignment_table(report))
    png = plot_alignment({"base model": report}, f"{out_dir}/alignment_before.png")
    console.print(f"figure: {png}")
    console.print(f"demo finished in {time.time() - t0:.0f} s")
    return {"alignment": {r.layer: r.alignment for r in report.rows}}
