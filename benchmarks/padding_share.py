"""Share of padding in the training micro-batches, with and without length-grouped batching, on a job's own data.

Run:  .venv/bin/python benchmarks/padding_share.py --config jobs/configs/smollm2_lite.yaml --world 1,2,4,8

Tokenizes the config's training data exactly as the job does (``prepare_training_data``, plus the sampled answers
the config asks for), then for each world size counts, over ``--epochs`` epochs, the padded tokens of every
micro-batch as ``training.loop.epoch_batches`` builds them (each micro-step padded to the longest row of any rank),
with ``data.group_by_length`` off and on (``data.length_group_size`` from the config or ``--group-size``). Padding
is compute the model spends on nothing, so 1 - share is the upper bound of the speed-up grouping can give per
token. Prints a table and one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training config (YAML)")
    parser.add_argument("--world", default="1,2,4,8", help="comma-separated world sizes")
    parser.add_argument("--epochs", type=int, default=3, help="epochs to average over")
    parser.add_argument("--group-size", type=int, help="override data.length_group_size")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)

    from layerexit.machine import describe_machine
    from layerexit.training import recipes
    from layerexit.training.config import load_train_config
    from layerexit.training.loop import padding_share
    from layerexit.training.ray_trainer import prepare_training_data

    cfg = load_train_config(args.config, [])
    data = prepare_training_data(cfg, show_progress=True)
    recipes.add_sampled_examples(cfg, data, show_progress=True)
    group = args.group_size or cfg.data.length_group_size
    rows = []
    for world in [int(w) for w in args.world.split(",")]:
        kw = dict(micro_batch=cfg.optim.micro_batch_size, world=world, grad_accum=cfg.optim.grad_accum,
                  seed=cfg.optim.seed)
        plain = sum(padding_share(data.train, epoch=e, **kw) for e in range(args.epochs)) / args.epochs
        grouped = sum(padding_share(data.train, epoch=e, group_size=group, **kw)
                      for e in range(args.epochs)) / args.epochs
        rows.append({"world": world, "padding_share_plain": plain, "padding_share_grouped": grouped})
    lengths = sorted(len(e.input_ids) for e in data.train)
    print(f"{len(lengths)} training sequences, lengths {lengths[0]}..{lengths[-1]} (median "
          f"{lengths[len(lengths) // 2]}); micro-batch {cfg.optim.micro_batch_size}, accumulation "
          f"{cfg.optim.grad_accum}, window {group}", file=sys.stderr)
    print("| ranks | padding, shuffled | padding, length-grouped | padded tokens per real token, before -> after |",
          file=sys.stderr)
    print("|---|---|---|---|", file=sys.stderr)
    for r in rows:
        print(f"| {r['world']} | {r['padding_share_plain']:.1%} | {r['padding_share_grouped']:.1%} | "
              f"{1 / (1 - r['padding_share_plain']):.2f} -> {1 / (1 - r['padding_share_grouped']):.2f} |",
              file=sys.stderr)
    result = {"benchmark": "padding_share", "config": args.config, "examples": len(lengths), "window": group,
              "micro_batch": cfg.optim.micro_batch_size, "grad_accum": cfg.optim.grad_accum, "rows": rows,
              "machine": describe_machine()}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
