"""LITE step time with 2 ranks: DeepSpeed ZeRO-3 vs ZeRO-2, on CPU (gloo), the code path the training job runs.

Run:  DS_ACCELERATOR=cpu .venv/bin/python benchmarks/zero3_step.py --model smollm2 --batch 2 --seq 128 --steps 4

For each ZeRO stage, two fresh processes (torch.multiprocessing, gloo) load the model, wrap it in the job's
``LiteObjective`` (exits every 4 layers from 8, uniform weights, chunked head under checkpointing), build the job's
optimizer and DeepSpeed config, and run warm-up + measured steps on micro-batches from ``epoch_batches`` over
examples of deliberately different lengths (each micro-step padded to one width on both ranks, the ZeRO-3 head-call
invariant). Reported per stage: median and fastest measured step (the slower rank of the two), each rank's peak RSS
(VmHWM) and the ZeRO-3 / ZeRO-2 ratio. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

from layerexit.localhost import free_port as _free_port


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _examples(n: int, seq: int, vocab: int, seed: int = 0):
    from layerexit.data.datasets import IGNORE_INDEX, TokenizedExample

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.choice([seq // 8, seq // 4, seq // 2, seq])  # deliberately different lengths
        prompt = max(1, length // 3)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        out.append(TokenizedExample(ids, [IGNORE_INDEX] * prompt + ids[prompt:], prompt))
    return out


def _rank(rank: int, world: int, port: int, args, stage: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import deepspeed
    import torch
    import torch.distributed as dist

    from layerexit.losses import exit_weights
    from layerexit.models.loading import load_model_and_tokenizer
    from layerexit.training.config import TrainConfig
    from layerexit.training.loop import LiteObjective, epoch_batches, param_groups
    from layerexit.training.ray_trainer import build_optimizer, deepspeed_config

    torch.set_num_threads(args.threads)
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(args.model, dtype=torch.float32)
    model.train()
    depth = model.config.num_hidden_layers
    exits = list(range(8, depth, 4)) if depth > 8 else list(range(1, depth))
    cfg = TrainConfig.model_validate({
        "name": "bench", "model": {"spec": args.model},
        "lite": {"exit_layers": exits, "chunk_size": args.chunk},
        "optim": {"micro_batch_size": args.batch, "lr": 1e-5},
        "deepspeed": {"zero_stage": stage, "precision": args.precision},
        "scaling": {"num_workers": world},
    })
    objective = LiteObjective(model, exit_weights(exits, depth, "uniform"), args.chunk)
    optimizer = build_optimizer(cfg, param_groups(objective, 0.0))
    engine, *_ = deepspeed.initialize(model=objective, optimizer=optimizer, config=deepspeed_config(cfg))
    n = (args.steps + args.warmup) * args.batch * world
    data = _examples(n, args.seq, len(tok))
    batches = list(epoch_batches(data, micro_batch=args.batch, world=world, rank=rank, grad_accum=1, epoch=0,
                                 seed=0, pad_id=tok.pad_token_id or 0))
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "autocast_bf16" else None
    times = []
    for i, batch in enumerate(batches):
        dist.barrier()
        t0 = time.perf_counter()
        if ctx is not None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = engine(**batch)
        else:
            out = engine(**batch)
        engine.backward(out["loss"])
        engine.step()
        dist.barrier()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    result = {"rank": rank, "times": times, "peak_rss_mib": _peak_rss_mib(),
              "widths": [int(b["input_ids"].shape[1]) for b in batches],
              "own_widths": [int(b["attention_mask"].sum(1).max()) for b in batches]}
    Path(out_dir, f"stage{stage}_rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "autocast_bf16"])
    parser.add_argument("--stages", default="2,3")
    args = parser.parse_args(argv)
    import tempfile

    import torch.multiprocessing as mp

    report: dict = {"args": vars(args), "stages": {}}
    with tempfile.TemporaryDirectory() as out_dir:
        for stage in [int(s) for s in args.stages.split(",")]:
            t0 = time.perf_counter()
            mp.spawn(_rank, args=(2, _free_port(), args, stage, out_dir), nprocs=2, join=True)
            ranks = [json.loads(Path(out_dir, f"stage{stage}_rank{r}.json").read_text()) for r in range(2)]
            slowest = [max(a, b) for a, b in zip(ranks[0]["times"], ranks[1]["times"], strict=True)]
            report["stages"][f"zero{stage}"] = {
                "step_s_median": statistics.median(slowest), "step_s_min": min(slowest),
                "peak_rss_mib": [round(r["peak_rss_mib"]) for r in ranks], "wall_s": time.perf_counter() - t0,
                "widths_rank0": ranks[0]["widths"], "own_widths": [r["own_widths"] for r in ranks],
            }
    st = report["stages"]
    if "zero2" in st and "zero3" in st:
        report["zero3_over_zero2_median"] = st["zero3"]["step_s_median"] / st["zero2"]["step_s_median"]
        report["zero3_over_zero2_min"] = st["zero3"]["step_s_min"] / st["zero2"]["step_s_min"]
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
