"""The `make demo` drafting stage: a short run of ``jobs/configs/smollm2_draft.yaml``'s recipe (a decoder-layer
adapter per shallow exit (8 and 10) on the frozen SmolLM2, distilled from its top-64 final-layer distribution, the draft chosen
from measured acceptance and shipped with the model), then lossless self-speculative decoding with the draft the
run chose against compiled ``final``: the same held-out prompts, one compiled engine, one run.

Called from ``layerexit.demo``: ``run_demo_drafting(console, out_dir)``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

DEMO_NAME = "demo_smollm2_draft"


def draft_demo_config(out_dir: str | Path, **overrides):
    """The demo's TrainConfig: the adapters recipe with decoder-layer adapters at exits 8/10 on 96 training
    instructions (greedy answers), a short run, then the draft choice."""
    from layerexit.training.demo_stage import demo_config

    settings = {
        "name": DEMO_NAME,
        "lite": {"exit_layers": [8, 10], "weights": "uniform"},
        "adapters": {"kind": "decoder_layer", "num_layers": 1, "init": "next_layers"},
        "optim": {"lr": 5.0e-4, "warmup_steps": 5, "schedule": "cosine", "min_lr_ratio": 0.1,
                  "micro_batch_size": 4, "grad_accum": 1, "epochs": 2, "max_steps": 40},
        # no alignment pass before training, and a short timing below: the demo must end within 20 minutes
        "eval": {"at_start": False, "alignment_prompts": 8, "alignment_max_new_tokens": 32},
        "draft": {"choose": True, "max_layer": 10, "max_draft": 3, "prompts": 4, "max_new_tokens": 32,
                  "vocab_size": 8192},
    }
    settings.update(overrides)
    return demo_config(out_dir, **settings)


def run_demo_drafting(console, out_dir: str | Path = "outputs/demo/draft", prompts: int = 3,
                      max_new_tokens: int = 32, **overrides) -> dict:
    """Train briefly, then time lossless drafting with the shipped draft settings against compiled ``final``."""
    import torch
    from rich.table import Table

    from layerexit.data.instructions import heldout_instructions
    from layerexit.data.prompts import format_prompt
    from layerexit.engine.bench import COMPILED, replay_name, run_bench
    from layerexit.engine.options import ExitConfig
    from layerexit.engine.reference import eos_ids
    from layerexit.models.draft_settings import draft_settings_of
    from layerexit.models.loading import load_model_and_tokenizer
    from layerexit.training.ray_trainer import run_training

    t0 = time.time()
    cfg = draft_demo_config(out_dir, **overrides)
    run_dir = cfg.storage_dir() / cfg.name
    if run_dir.exists():
        shutil.rmtree(run_dir)  # the demo always trains from the base model
    console.rule("2b. Drafts that agree: decoder-layer adapters on shallow exits, chosen by measured acceptance")
    result = run_training(cfg, console=console, show_progress=True)
    model, tok = load_model_and_tokenizer(str(result.hf_model_dir), dtype=torch.bfloat16)
    shipped = draft_settings_of(model)
    ids = [format_prompt(tok, it.text) for it in heldout_instructions()[:prompts]]
    configs = {"final": ExitConfig(), "lossless draft": ExitConfig(policy="self-speculative")}
    k = int(shipped.get("num_draft", ExitConfig().num_draft)) if shipped else ExitConfig().num_draft
    # The loop's own ceiling at the shipped k (the final layer's answer replayed as a free perfect draft); compiling
    # happens in the warm-up, never inside the timing.
    rows, outputs = run_bench(model, ids, configs, eos_ids(model, tok), tok.pad_token_id,
                              max_new_tokens=max_new_tokens, compile=True, floor=False, show_progress=True,
                              replay_ks=(k,))
    by_name = {r.name: r for r in rows}
    final, draft = by_name["final" + COMPILED], by_name["lossless draft" + COMPILED]
    replay = by_name.get(replay_name(k, True))
    table = Table(title=f"Lossless drafting vs compiled final: {prompts} held-out prompts x {max_new_tokens} tokens, "
                        "bf16, batch 1, same compiled engine")
    for col in ("configuration", "tokens/s", "vs compiled final", "tokens equal to final"):
        table.add_column(col, justify="right")
    for row in (final, draft, *([replay] if replay is not None else [])):
        table.add_row(row.name, f"{row.tokens_per_s:.1f}", f"{row.tokens_per_s / final.tokens_per_s:.2f}x",
                      f"{row.identical:.0%}" if row.identical is not None else "-")
    console.print(table)
    console.print(f"draft shipped with the model: {shipped} (bf16 verification can flip near-ties; in fp32 the "
                  "tokens are the final layer's exactly)")
    return {"draft_settings": shipped, "hf_model_dir": str(result.hf_model_dir), "run_id": result.run_id,
            "final_tokens_per_s": final.tokens_per_s, "draft_tokens_per_s": draft.tokens_per_s,
            "speedup_vs_compiled_final": draft.tokens_per_s / final.tokens_per_s,
            "identical": draft.identical, "seconds": time.time() - t0,
            "replay_tokens_per_s": replay.tokens_per_s if replay is not None else None}
