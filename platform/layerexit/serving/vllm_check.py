"""Offline vLLM check of a draft: acceptance, and greedy tokens with the draft against those without it.

    .venv-vllm/bin/python -m layerexit.serving.vllm_check --model smollm2 --draft DIR --dtype float32 --compare

Runs vLLM's offline ``LLM`` (no Serve, no HTTP) on instruction prompts (default: the 8 demo prompts), greedy, and prints
one JSON object: the speculative-decoding counters (drafts, draft tokens, accepted tokens, per position), the
acceptance rate, tokens/s, and with ``--compare`` the same prompts without the draft and how many completions are
token-for-token identical (in fp32 all of them: drafting is lossless). The model and draft go through the same
resolution and checks as the Serve backend (``vllm_config.resolve_sources``). Needs ``.venv-vllm``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

DEMO_PROMPTS = Path(__file__).resolve().parents[1] / "data" / "resources" / "demo_prompts.jsonl"
SPEC_COUNTERS = {
    "vllm:spec_decode_num_drafts": "drafts",
    "vllm:spec_decode_num_draft_tokens": "draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "accepted_tokens",
}


def read_prompts(path: Path, limit: int | None) -> list[str]:
    prompts = []
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            prompts.append(record["prompt"] if isinstance(record, dict) else str(record))
    return prompts[:limit] if limit else prompts


def spec_metrics(llm) -> dict[str, Any]:
    """The engine's speculative-decoding counters (what Prometheus gets as vllm:spec_decode_*)."""
    out: dict[str, Any] = {name: 0 for name in SPEC_COUNTERS.values()}
    for metric in llm.get_metrics():
        if metric.name in SPEC_COUNTERS:
            out[SPEC_COUNTERS[metric.name]] += int(metric.value)
        elif metric.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            out["accepted_per_position"] = [int(v) for v in metric.values]
    if out["draft_tokens"]:
        out["acceptance"] = round(out["accepted_tokens"] / out["draft_tokens"], 4)
    if out["drafts"] and out.get("accepted_per_position"):
        out["acceptance_per_position"] = [round(v / out["drafts"], 4) for v in out["accepted_per_position"]]
    return out


def complete(llm, prompts: list[str], params) -> list:
    """vLLM outputs for ``prompts`` formatted as our engine formats them (``data.prompts.format_prompt``): through the
    tokenizer's chat template when it has one (``llm.chat``), else as raw text with the tokenizer's special tokens
    (``llm.generate``): LLaMA-2 base and the LITE models trained from it have no chat template, and ``llm.chat``
    refuses a tokenizer without one."""
    if getattr(llm.get_tokenizer(), "chat_template", None):
        return llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
    return llm.generate(list(prompts), params, use_tqdm=False)


def run(model: str, speculative: dict[str, Any] | None, prompts: list[str], args) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(model=model, dtype=args.dtype, enforce_eager=not args.compile, max_model_len=args.max_model_len,
              max_num_seqs=args.max_num_seqs, speculative_config=speculative, seed=0, disable_log_stats=False)
    start_s = time.perf_counter() - started
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    tokens: list[list[int]] = []
    gen_s = 0.0
    # One request at a time (batch 1, the regime the issue measures) unless --batch.
    groups = [list(prompts)] if args.batch else [[p] for p in prompts]
    for group in groups:
        t0 = time.perf_counter()
        outputs = complete(llm, group, params)
        gen_s += time.perf_counter() - t0
        tokens.extend(list(o.outputs[0].token_ids) for o in outputs)
    result = {"start_s": round(start_s, 1), "generate_s": round(gen_s, 2),
              "tokens": sum(len(t) for t in tokens), "tokens_per_s": round(sum(len(t) for t in tokens) / gen_s, 2),
              "token_ids": tokens}
    if speculative is not None:
        result["spec_decode"] = spec_metrics(llm)
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m layerexit.serving.vllm_check", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="model spec (smollm2, a directory, models:/...)")
    parser.add_argument("--draft", default=None, help="draft: a directory / models:/ URI (a layer or an EAGLE-3 "
                        "export), shipped (the EAGLE-3 draft the model carries), or ngram")
    parser.add_argument("--draft-method", default="auto", choices=["auto", "draft_model", "eagle3"])
    parser.add_argument("--num-draft", type=int, default=None,
                        help="default: the draft's shipped num_draft, else 3")
    parser.add_argument("--prompts", type=Path, default=DEMO_PROMPTS, help="JSONL with a `prompt` field per line")
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    parser.add_argument("--compare", action="store_true", help="also run without the draft and compare tokens")
    parser.add_argument("--batch", action="store_true", help="send all prompts at once (default: one at a time)")
    parser.add_argument("--compile", action="store_true", help="let vLLM compile (default: enforce_eager)")
    parser.add_argument("--mlflow-tracking-uri", default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)

    from layerexit.errors import LayerexitError
    from layerexit.serving.vllm_backend import speculative_config
    from layerexit.serving.vllm_config import parse_vllm_args, require_vllm, resolve_sources

    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    try:
        require_vllm()
        cfg = parse_vllm_args({"model": args.model, "draft": args.draft, "device": "cpu", "dtype": args.dtype,
                               "num_draft": args.num_draft,
                               "draft_method": args.draft_method, "mlflow_tracking_uri": args.mlflow_tracking_uri},
                              "vllm_check arguments")
        sources = resolve_sources(cfg)
    except LayerexitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    prompts = read_prompts(args.prompts, args.limit)
    spec = speculative_config(cfg, sources)
    report: dict[str, Any] = {"model": sources.model, "draft": sources.draft, "method": sources.method,
                              "dtype": args.dtype, "num_draft": sources.num_draft,
                              "prompts": len(prompts), "max_tokens": args.max_tokens}
    report["with_draft"] = run(sources.model, spec, prompts, args)
    if args.compare:
        report["without_draft"] = run(sources.model, None, prompts, args)
        pairs = zip(report["with_draft"]["token_ids"], report["without_draft"]["token_ids"])
        report["identical"] = sum(a == b for a, b in pairs)
    text = json.dumps(report)
    if args.json:
        args.json.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":  # vLLM spawns processes: the guard keeps them from re-running this
    sys.exit(main())
