"""python jobs/evaluate.py --config jobs/configs/eval_smollm2.yaml [key=value ...]

Reproduce the LITE paper's evaluation (Tables 1, 2, 6; Figures 5-10) for a model, prompt sets and exit
configurations; writes report.md, report.json and PNG figures to `output_dir` and logs them to MLflow.
As a Ray job:  ray job submit --working-dir . -- python jobs/evaluate.py --config jobs/configs/eval_smollm2.yaml
Examples of overrides:  model=/path/to/lite-checkpoint  max_new_tokens=32  kv=none  mlflow.enabled=false
Check only (load and validate the config with its overrides, start nothing, exit 0; 2 naming the field otherwise):
    python jobs/evaluate.py --config jobs/configs/eval_smollm2.yaml --check
"""

from __future__ import annotations

import argparse
import sys

from layerexit.errors import LayerexitError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="Eval YAML (default: built-in methods on the held-out prompts).")
    parser.add_argument("--model", help="Model spec overriding the config's `model`.")
    parser.add_argument("--judge-url", help="OpenAI-compatible base URL of an LLM judge, e.g. http://host:8000/v1.")
    parser.add_argument("--judge-model", help="Model name the judge endpoint serves.")
    parser.add_argument("--output-dir", help="Where report.md, report.json and figures go.")
    parser.add_argument("--limit", type=int, help="Use N prompts of every prompt set (categories taken in turn).")
    parser.add_argument("--max-new-tokens", type=int, help="Tokens generated per prompt and method.")
    parser.add_argument("--no-mlflow", action="store_true", help="Do not log to MLflow.")
    parser.add_argument("--check", action="store_true",
                        help="Validate the config with its overrides and exit (no model, no Ray, no MLflow).")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config (dotted keys).")
    args = parser.parse_args(argv)
    from layerexit.evaluation.cli_eval import build_eval_config, eval_command

    try:
        if args.check:
            cfg = build_eval_config(args.config, args.overrides, model=args.model, judge_url=args.judge_url,
                                    judge_model=args.judge_model, output_dir=args.output_dir, limit=args.limit,
                                    max_new_tokens=args.max_new_tokens, no_mlflow=args.no_mlflow)
            print(f"config {args.config or '<built-in>'} is valid: model {cfg.model}, "
                  f"{len(cfg.methods)} methods, {len(cfg.prompt_sets)} prompt sets")
            return 0
        eval_command(args.config, args.overrides, model=args.model, judge_url=args.judge_url,
                     judge_model=args.judge_model, output_dir=args.output_dir, limit=args.limit,
                     max_new_tokens=args.max_new_tokens, no_mlflow=args.no_mlflow)
    except LayerexitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
