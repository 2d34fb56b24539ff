"""The `make demo` pipeline on the embedded SmolLM2 (CPU). Each stage prints what a user should look at.

1. Answers from the final layer and the per-layer alignment table of the untuned model.
2. A short LITE fine-tuning run (Ray Train + DeepSpeed, tracked in MLflow) and the alignment after it.
2b. A short run of the draft recipe (decoder-layer adapters on shallow exits, the draft chosen from measured
   acceptance) and its lossless speedup against compiled ``final`` on the same prompts.
3. Evaluation of the trained model: cost improvement, similarity and answer length per exit configuration.
4. A small Ray Tune threshold search whose result is used for serving.
5. Ray Serve: the trained model behind an OpenAI-compatible API, one chat request through the `openai` client.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.panel import Panel

from layerexit.data.prompts import builtin_prompts_path, format_prompt, read_prompts
from layerexit.engine.reference import eos_ids, hf_greedy_generate_batched
from layerexit.evaluation.alignment import alignment_from_generations, plot_alignment
from layerexit.evaluation.tables import alignment_table
from layerexit.models.loading import load_model_and_tokenizer

STAGES = ("answers", "train", "draft", "eval", "tune", "serve")


def stage_answers(console: Console, model_spec: str, max_new_tokens: int, answers: int, out_dir: Path) -> dict:
    from layerexit.machine import choose_dtype

    dtype = choose_dtype("batched", what="demo answers")  # batches of 4 prompts: compute-bound
    model, tokenizer = load_model_and_tokenizer(model_spec, dtype=dtype.torch_dtype)
    console.print(f"loaded {type(model).__name__}: {model.config.num_hidden_layers} layers, "
                  f"hidden {model.config.hidden_size}, vocab {model.config.vocab_size}; {dtype.dtype} "
                  f"(dtype auto: {dtype.reason})")
    prompts = read_prompts(builtin_prompts_path())
    prompt_ids = [format_prompt(tokenizer, p.prompt) for p in prompts]
    responses = hf_greedy_generate_batched(
        model, prompt_ids, max_new_tokens, tokenizer.pad_token_id, batch_size=4, eos=eos_ids(model, tokenizer)
    )
    console.rule("1a. Answers from the final layer (greedy, KV cache)")
    for p, r in list(zip(prompts, responses, strict=True))[:answers]:
        console.print(Panel(tokenizer.decode(r, skip_special_tokens=True).strip(), title=p.prompt, title_align="left"))
    console.rule("1b. Per-layer alignment with the final layer (before LITE)")
    report = alignment_from_generations(model, prompt_ids, responses)
    console.print(alignment_table(report))
    png = plot_alignment({"base model": report}, out_dir / "alignment_before.png")
    console.print(f"figure: {png}")
    return {"alignment": {r.layer: r.alignment for r in report.rows}}


def run_demo(model_spec: str = "smollm2", max_new_tokens: int = 64, answers: int = 3, out_dir: str = "outputs/demo",
             stages: tuple[str, ...] = STAGES) -> dict:
    """Run the demo stages in order and return what each reported."""
    console = Console()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    console.rule(f"layerexit demo: {model_spec}")
    from layerexit.machine import machine_line

    console.print(f"machine: {machine_line()}")
    summary: dict = {}
    timings: dict[str, float] = {}

    def timed(name, fn):
        start = time.time()
        summary[name] = fn()
        timings[name] = time.time() - start

    if "answers" in stages:
        timed("answers", lambda: stage_answers(console, model_spec, max_new_tokens, answers, out))
    trained = model_spec
    if "train" in stages:
        from layerexit.training.demo_stage import run_demo_training

        timed("train", lambda: run_demo_training(console, out / "train"))
        trained = summary["train"].get("hf_model_dir", model_spec)
    if "draft" in stages:
        from layerexit.training.draft_demo_stage import run_demo_drafting

        timed("draft", lambda: run_demo_drafting(console, out / "draft"))
    if "eval" in stages:
        from layerexit.engine.options import ExitConfig
        from layerexit.evaluation.demo_stage import run_demo_eval

        console.rule("3. Evaluation of the trained model")
        configs = {
            "final": ExitConfig(policy="final"),
            "paper-7b": ExitConfig(policy="confidence", thresholds="paper-7b"),
            "paper-7b-aggressive": ExitConfig(policy="confidence", thresholds="paper-7b-aggressive"),
        }
        timed("eval", lambda: run_demo_eval(console, trained, configs, out / "eval", mlflow=True))
    user_config = {"policy": "confidence", "thresholds": "paper-7b", "kv": "recompute"}
    if "tune" in stages:
        from layerexit.tuning.demo_stage import run_demo_tuning

        console.rule("4. Threshold search (Ray Tune)")
        timed("tune", lambda: run_demo_tuning(console, trained, out / "tune"))
        user_config = summary["tune"].get("user_config", user_config)
    if "serve" in stages:
        from layerexit.serving.demo_stage import run_demo_serving

        console.rule("5. Serving (Ray Serve, OpenAI-compatible API)")
        timed("serve", lambda: run_demo_serving(console, trained, user_config))
    console.rule("done")
    console.print("stage timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    console.print(f"demo finished in {time.time() - t0:.0f} s; outputs in {out}/; compare runs with `mlflow ui`")
    return summary
