"""Engine benchmark: transformers `generate` (KV cache, greedy) vs every policy x KV strategy, in one run.

Run:  .venv/bin/python benchmarks/engine_bench.py --model smollm2 --prompts 32 --max-new-tokens 64 \
          --out outputs/bench/engine_smollm2.md

Prompts are the held-out split of the project's instruction set (never trained on), or --prompt-file (JSONL, e.g.
the quoting set from benchmarks/quoting_prompts.py). Thresholds default to the paper's `paper-7b` preset mapped
to the model's layers. Rows include the eager weights loop, the memory-bandwidth floor (weight bytes per token over
the bandwidth measured in the run) and, when a --config drafts from n-grams, transformers' prompt-lookup decoding;
every row carries the machine (CPU, ISA flags, threads). Results (Markdown + JSON) go to --out. `layerexit bench` is the same benchmark as a command.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompts", type=int, default=32, help="number of held-out prompts")
    parser.add_argument("--prompt-file", default=None, help="JSONL prompts instead of the held-out split")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--thresholds", default="paper-7b", help="preset, thresholds file, or JSON {layer: threshold}")
    parser.add_argument("--draft-layer", type=int, default=None, help="self-speculative draft layer")
    parser.add_argument("--num-draft", type=int, default=4)
    parser.add_argument("--policies", default="final,confidence,random,random-uniform,sequential,self-speculative")
    parser.add_argument("--kv", default="recompute,propagate,none", help="KV strategies for lossy policies")
    parser.add_argument("--config", action="append", default=[], metavar="NAME=JSON",
                        help="extra configuration, e.g. 'probe/propagate={\"policy\": \"probe\", \"thresholds\": "
                        "\"probe.yaml\", \"kv\": \"propagate\"}' (repeatable)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--no-similarity", action="store_true", help="skip the spaCy similarity column")
    parser.add_argument("--out", default="outputs/bench/engine.md")
    args = parser.parse_args()

    from layerexit.data.instructions import heldout_instructions
    from layerexit.data.prompts import format_prompt
    from layerexit.engine.bench import bench_markdown, run_bench
    from layerexit.machine import machine_line
    from layerexit.engine.options import ExitConfig
    from layerexit.engine.reference import eos_ids
    from layerexit.models.loading import load_model_and_tokenizer

    torch.set_num_threads(args.threads)
    model, tok = load_model_and_tokenizer(args.model, dtype=getattr(torch, args.dtype))
    L = model.config.num_hidden_layers
    if args.prompt_file:
        from layerexit.data.prompts import read_prompts

        texts = [p.prompt for p in read_prompts(args.prompt_file, limit=args.prompts)]
    else:
        texts = [it.text for it in heldout_instructions()[: args.prompts]]
    ids = [format_prompt(tok, text) for text in texts]
    thresholds = json.loads(args.thresholds) if args.thresholds.lstrip().startswith("{") else args.thresholds
    configs: dict[str, ExitConfig] = {}
    for pol in filter(None, args.policies.split(",")):
        if pol == "final":
            configs["final"] = ExitConfig(policy="final")
        elif pol == "self-speculative":
            configs["self-speculative"] = ExitConfig(policy="self-speculative", layer=args.draft_layer or (2 * L) // 3,
                                                     num_draft=args.num_draft)
        else:
            for kv in args.kv.split(","):
                configs[f"{pol}/{kv}"] = ExitConfig(policy=pol, thresholds=thresholds, kv=kv)
    for item in args.config:
        name, _, spec = item.partition("=")
        configs[name] = ExitConfig(**json.loads(spec))
    t0 = time.time()
    rows, outputs = run_bench(model, ids, configs, eos_ids(model, tok), tok.pad_token_id, args.max_new_tokens,
                              args.batch_size)
    if not args.no_similarity and "final" in outputs:
        from layerexit.evaluation.similarity import spacy_similarities

        def texts(results):
            return [tok.decode(r.token_ids, skip_special_tokens=True) for r in results]

        reference = texts(outputs["final"])
        for row in rows:
            if row.name in outputs:
                sims = spacy_similarities(reference, texts(outputs[row.name]))
                row.similarity = sum(sims) / len(sims)
    table = bench_markdown(rows)
    header = (f"model `{args.model}` ({L} layers, {args.dtype}), {len(ids)} held-out prompts, "
              f"max {args.max_new_tokens} new tokens, batch {args.batch_size}, thresholds `{args.thresholds}`, "
              f"torch {torch.__version__}, {machine_line()}, "
              f"{time.time() - t0:.0f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + "\n\n" + table + "\n")
    out.with_suffix(".json").write_text(json.dumps({"header": header, "rows": [r.to_dict() for r in rows]}, indent=1))
    print(header)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
