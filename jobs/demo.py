"""The `make demo` job: the whole pipeline on the embedded SmolLM2 model, on CPU.

Launch:  make demo            (or: .venv/bin/python jobs/demo.py --model smollm2)
"""

from __future__ import annotations

import argparse
import sys

from layerexit.errors import LayerexitError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2, a local HF directory, a .gguf, or a hub id")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens per answer")
    parser.add_argument("--out-dir", default="outputs/demo", help="where figures and reports go")
    parser.add_argument("--stages", default="answers,train,draft,eval,tune,serve",
                        help="comma-separated subset of answers,train,draft,eval,tune,serve")
    args = parser.parse_args(argv)
    from layerexit.demo import STAGES, run_demo

    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    try:
        run_demo(args.model, max_new_tokens=args.max_new_tokens, out_dir=args.out_dir, stages=stages)
    except LayerexitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
