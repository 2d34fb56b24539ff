"""Write a prompt set whose answers quote the prompt (rewrite / extract / repeat this text), for n-gram drafting.

Run:  .venv/bin/python benchmarks/quoting_prompts.py --out outputs/bench/quoting.jsonl --n 12

Passages are held-out instructions of the project's own offline instruction set (three per prompt), so the set is
deterministic, offline, and never trained on. Tasks are the kinds where prompt lookup pays: repeat, copy into a
list, extract, lightly rewrite.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TASKS = (
    "Repeat the following text word for word:",
    "Copy the questions below into a numbered list, keeping their wording:",
    "Extract every question from the text below and list them one per line:",
    "Rewrite the following text with each sentence on its own line, keeping the wording:",
)


def quoting_prompts(n: int) -> list[dict]:
    from layerexit.data.instructions import heldout_instructions

    texts = [it.text for it in heldout_instructions()]
    out = []
    for i in range(n):
        passage = " ".join(texts[(3 * i + j) % len(texts)] for j in range(3))
        out.append({"prompt": f"{TASKS[i % len(TASKS)]}\n\n{passage}", "id": f"quote-{i:03d}", "category": "quoting"})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, default=12)
    args = parser.parse_args()
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p) + "\n" for p in quoting_prompts(args.n)))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
