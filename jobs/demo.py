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
    args = parser.parse_args(argv)
    from layerexit.demo import run_demo

    try:
        run_demo(args.model, max_new_tokens=args.max_new_tokens, out_dir=args.out_dir)
    except LayerexitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
