"""Per-rank host memory of loading the model for training: a full copy per rank (ZeRO-2) vs ZeRO-3 sharded
construction (``training.sharded_load``), at 1, 2 and 4 ranks, on CPU (gloo), the job's own code.

Run:  DS_ACCELERATOR=cpu .venv/bin/python benchmarks/zero3_host_memory.py --model smollm2 --ranks 1,2,4 --steps 2

For each (path, ranks) fresh processes (torch.multiprocessing, gloo) load the model with ``load_for_training``
(and, with ``--teacher``, the frozen anchor teacher with ``load_teacher``), wrap it in the job's ``LiteObjective``,
``deepspeed.initialize`` it with the job's config and run ``--steps`` LITE steps (proof that the sharded model
trains). Reported per rank: parameter bytes held after loading (``rank_param_bytes``: the ZeRO-3 partition), the
peak growth of anonymous RSS while loading (``PeakRss``, sampled every 2 ms: heap and tensors, not the page cache of
the memory-mapped checkpoint) and the process's peak RSS over the whole run (VmHWM). Prints one JSON object and a
table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch.multiprocessing as mp
from proc_memory import rss_kib

from layerexit.localhost import free_port


def _rank(rank: int, world: int, port: int, args, stage: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import deepspeed
    import torch

    from layerexit.data.datasets import IGNORE_INDEX, TokenizedExample
    from layerexit.losses import exit_weights
    from layerexit.training.config import TrainConfig
    from layerexit.training.loop import FrozenTeacher, LiteObjective, epoch_batches, param_groups
    from layerexit.training.ray_trainer import build_optimizer, deepspeed_config
    from layerexit.training.sharded_load import load_for_training, load_teacher

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = TrainConfig.model_validate({
        "name": "zero3_host_memory", "model": {"spec": args.model},
        "lite": {"exit_layers": [2], "weights": "uniform", "chunk_size": 32, "anchor_weight": 0.1 if args.teacher else 0.0},
        "optim": {"lr": 1e-5, "micro_batch_size": 1, "grad_accum": 1},
        "deepspeed": {"zero_stage": stage, "precision": "fp32"}, "scaling": {"num_workers": world},
    })
    ds_config = deepspeed_config(cfg)
    model, tokenizer, report = load_for_training(args.model, torch.float32, ds_config)
    teacher_report = None
    teacher = None
    if args.teacher:
        t_model, teacher_report = load_teacher(args.model, torch.float32, ds_config, "cpu")
        teacher = FrozenTeacher(t_model)
    depth = model.config.num_hidden_layers
    objective = LiteObjective(model, exit_weights([2], depth, "uniform"), 32, anchor_weight=cfg.lite.anchor_weight)
    engine, *_ = deepspeed.initialize(model=objective, optimizer=build_optimizer(cfg, param_groups(objective, 0.0)),
                                      config=ds_config)
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(args.steps * world):
        ids = torch.randint(3, model.config.vocab_size, (args.seq,), generator=g).tolist()
        data.append(TokenizedExample(ids, [IGNORE_INDEX] * 8 + ids[8:], 8))
    losses = []
    kwargs = {"teacher": teacher} if teacher is not None else {}
    for batch in epoch_batches(data, micro_batch=1, world=world, rank=rank, grad_accum=1, epoch=0, seed=0, pad_id=0):
        out = engine(**batch, **kwargs)
        engine.backward(out["loss"])
        engine.step()
        losses.append(float(out["loss"].detach()))
    row = {"rank": rank, "params_mib": report.param_bytes / 2**20,
           "load_peak_mib": report.load_peak_delta_bytes / 2**20, "load_s": report.seconds,
           "teacher_params_mib": teacher_report.param_bytes / 2**20 if teacher_report else None,
           "vm_hwm_mib": rss_kib("VmHWM") / 1024, "losses": losses, "sharded": report.sharded}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(row))


def measure(args, stage: int, world: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(world, free_port(), args, stage, out), nprocs=world, join=True)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="model spec (registry name, directory, hub id)")
    parser.add_argument("--ranks", default="1,2,4", help="comma-separated world sizes")
    parser.add_argument("--stages", default="2,3", help="ZeRO stages to compare (2: full copy per rank, 3: sharded)")
    parser.add_argument("--steps", type=int, default=2, help="LITE steps after loading")
    parser.add_argument("--seq", type=int, default=64, help="tokens per training sequence")
    parser.add_argument("--teacher", action="store_true", help="also load the frozen anchor teacher")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from layerexit.machine import describe_machine

    rows = []
    for stage in [int(s) for s in args.stages.split(",")]:
        for world in [int(w) for w in args.ranks.split(",")]:
            ranks = measure(args, stage, world)
            rows.append({"zero_stage": stage, "ranks": world, "per_rank": ranks,
                         "params_mib_max": max(r["params_mib"] for r in ranks),
                         "load_peak_mib_max": max(r["load_peak_mib"] for r in ranks),
                         "vm_hwm_mib_max": max(r["vm_hwm_mib"] for r in ranks)})
            print(f"ZeRO-{stage} x{world}: params/rank {rows[-1]['params_mib_max']:.0f} MiB, load peak "
                  f"{rows[-1]['load_peak_mib_max']:.0f} MiB, peak RSS {rows[-1]['vm_hwm_mib_max']:.0f} MiB, "
                  f"losses {[round(l, 3) for l in ranks[0]['losses']]}", file=sys.stderr, flush=True)
    result = {"benchmark": "zero3_host_memory", "model": args.model, "teacher": args.teacher, "rows": rows,
              "machine": describe_machine()}
    print(json.dumps(result))
    print("| path | ranks | parameters per rank (MiB) | load peak, anon RSS growth (MiB) | peak RSS (MiB) |",
          file=sys.stderr)
    print("|---|---|---|---|---|", file=sys.stderr)
    for r in rows:
        path = "ZeRO-3 sharded init" if r["zero_stage"] == 3 else f"ZeRO-{r['zero_stage']} full copy"
        print(f"| {path} | {r['ranks']} | {r['params_mib_max']:.0f} | {r['load_peak_mib_max']:.0f} | "
              f"{r['vm_hwm_mib_max']:.0f} |", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
