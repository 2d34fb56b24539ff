"""LITE training steps of a LLaMA-2-7B-shaped model (random weights) under DeepSpeed ZeRO (3 by default) bf16 on ONE
GPU, with model FLOPs utilisation (MFU).

Run (a GPU machine, no network needed; about 5 minutes on an H200):
    DS_ACCELERATOR=cuda .venv/bin/python benchmarks/gpu_zero3_7b.py --steps 10 --batch 4 --seq 512

Code-path check on a CPU (a tiny shape, DS_ACCELERATOR=cpu, gloo; the numbers mean nothing):
    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/gpu_zero3_7b.py --shape tiny --steps 2

The model is LlamaForCausalLM with hidden 4096, 32 heads, intermediate 11008, vocab 32000 (LLaMA-2 7B) and
``--layers`` decoder layers: ``auto`` takes 32 when ~16 bytes per parameter (bf16 weights and gradients, fp32
master weights and Adam moments) plus headroom fit in the GPU, else 24, else 16. Exits follow
jobs/configs/llama2_7b_lite.yaml scaled to the depth (32 layers: 8, 12, ..., 28 + final), uniform weights, head
chunks of 128 positions under activation checkpointing, decoder gradient checkpointing on. Everything the job
uses is used here: ``TrainConfig`` -> ``deepspeed_config`` (ZeRO-3, bf16), ``build_optimizer``, ``LiteObjective``,
``epoch_batches`` (one width per micro-step). torch.distributed starts as a single rank from MASTER_ADDR/
MASTER_PORT/RANK/WORLD_SIZE (defaults 127.0.0.1/29500/0/1), as `deepspeed` or torchrun would set them.

Prints one JSON object: step times (median, min), tokens/s, peak GPU memory (allocated and reserved), model size,
and MFU: model FLOPs per token (``train_flops_per_token``: 6 x the decoder and final-head matmul parameters, causal
attention 6 x layers x hidden x seq, and 6 x hidden x vocab per extra LITE exit head; activation recomputation is
not counted, as MFU does not) x tokens/s over the chip's dense bf16 peak (``--peak-tflops``, else a table by device
name). ``benchmarks/gpu_mfu_7b.py`` runs this over batch, ZeRO stage and recomputation and keeps the best.
Exits 2 with a message when no CUDA GPU is visible (unless --shape tiny).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SHAPES = {
    "7b": dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008,
               vocab_size=32000, max_position_embeddings=4096),
    "tiny": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=128,
                 vocab_size=512, max_position_embeddings=1024),
}
BYTES_PER_PARAM = 16  # bf16 weight + bf16 grad + fp32 master + fp32 Adam m and v (ZeRO-3, one rank)
HEADROOM_BYTES = 14 * 2**30  # activations (checkpointed), head chunks, DeepSpeed buckets, allocator slack


def layer_matmul_params(shape: dict) -> int:
    """Weights of one decoder layer's linear maps (q, o; k, v; gate, up, down)."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    return 2 * h * h + 2 * h * kv + 3 * h * i


def params_for(shape: dict, layers: int) -> int:
    h, v = shape["hidden_size"], shape["vocab_size"]
    return layers * (layer_matmul_params(shape) + 2 * h) + 2 * v * h + h  # + 2 norms per layer, embeddings, head


def pick_layers(shape: dict, requested: str, gpu_bytes: int | None) -> int:
    if requested != "auto":
        return int(requested)
    if gpu_bytes is None:
        return 4
    for layers in (32, 24, 16, 8):
        if params_for(shape, layers) * BYTES_PER_PARAM + HEADROOM_BYTES <= 0.95 * gpu_bytes:
            return layers
    return 4


# Dense bf16 peak (no sparsity), TFLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "GH200": 989.4, "B200": 2250.0,
                    "A100": 312.0, "L40S": 362.1, "A10G": 125.0}


def peak_tflops(device_name: str) -> float | None:
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key in device_name:
            return PEAK_BF16_TFLOPS[key]
    return None


def train_flops_per_token(shape: dict, layers: int, seq: int, extra_heads: int) -> float:
    """Model FLOPs of one training token (forward + backward = 3x forward), no recomputation counted."""
    h, v = shape["hidden_size"], shape["vocab_size"]
    matmul_params = layers * layer_matmul_params(shape) + h * v  # decoder linears + final LM head
    attention = 6 * layers * h * seq  # QK^T and AV, causal (half the square), x3 for fwd+bwd
    return 6 * matmul_params + attention + 6 * h * v * extra_heads


def exit_layers(depth: int) -> list[int]:
    """The paper's exits for 32 layers (8..28 step 4), scaled: every depth/8 layers from depth/4."""
    step = max(1, depth // 8)
    return list(range(max(1, depth // 4), depth, step))


def random_model(shape: dict, layers: int, device: torch.device | str) -> torch.nn.Module:
    """LlamaForCausalLM of ``shape`` with ``layers`` decoder layers, randomly initialised (seed 0) directly on
    ``device`` in bf16 (no fp32 copy on the host), untied head."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=layers, tie_word_embeddings=False, **shape)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            return LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--layers", default="auto", help="decoder layers, or auto (32/24/16 by GPU memory)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=10, help="measured steps")
    parser.add_argument("--warmup", type=int, default=2, help="steps before measuring")
    parser.add_argument("--chunk", type=int, default=128, help="LM-head chunk (positions)")
    parser.add_argument("--offload-optimizer", action="store_true", help="ZeRO-Offload the optimizer (CPU Adam)")
    parser.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=3, help="DeepSpeed ZeRO stage")
    parser.add_argument("--no-grad-ckpt", action="store_true", help="no decoder activation recomputation")
    parser.add_argument("--peak-tflops", type=float, help="the chip's dense bf16 peak (default: by device name)")
    args = parser.parse_args(argv)

    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu and args.shape != "tiny":
        print("error: no CUDA GPU visible; this benchmark measures ZeRO-3 bf16 on a GPU. "
              "On a CPU, check the code path with --shape tiny (and DS_ACCELERATOR=cpu).", file=sys.stderr)
        return 2
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if on_gpu else "cpu")
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500"), ("RANK", "0"), ("WORLD_SIZE", "1"),
                       ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    import deepspeed

    from layerexit.data.datasets import IGNORE_INDEX, TokenizedExample
    from layerexit.losses import exit_weights
    from layerexit.training.config import TrainConfig
    from layerexit.training.loop import LiteObjective, epoch_batches, param_groups
    from layerexit.training.ray_trainer import build_optimizer, deepspeed_config

    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    shape = SHAPES[args.shape]
    gpu_total = torch.cuda.get_device_properties(device).total_memory if on_gpu else None
    depth = pick_layers(shape, args.layers, gpu_total)
    exits = exit_layers(depth)
    cfg = TrainConfig.model_validate({
        "name": "gpu_zero3_bench", "model": {"spec": "random-7b-shape", "gradient_checkpointing": not args.no_grad_ckpt},
        "lite": {"exit_layers": exits, "weights": "uniform", "chunk_size": args.chunk},
        "optim": {"lr": 2e-5, "micro_batch_size": args.batch, "grad_accum": 1, "grad_clip": 1.0},
        "deepspeed": {"zero_stage": args.zero_stage, "precision": "bf16", "offload_optimizer": args.offload_optimizer},
        "scaling": {"num_workers": 1, "use_gpu": True},
    })

    t0 = time.perf_counter()
    model = random_model(shape, depth, device)  # directly on the GPU, in bf16 (no 27 GB fp32 copy on the host)
    if not args.no_grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    objective = LiteObjective(model, exit_weights(exits, depth, "uniform"), args.chunk)
    optimizer = build_optimizer(cfg, param_groups(objective, 0.0))
    engine, *_ = deepspeed.initialize(model=objective, optimizer=optimizer, config=deepspeed_config(cfg))
    setup_s = time.perf_counter() - t0

    g = torch.Generator().manual_seed(0)
    total = (args.warmup + args.steps) * args.batch
    data = []
    for _ in range(total):
        ids = torch.randint(3, shape["vocab_size"], (args.seq,), generator=g).tolist()
        prompt = args.seq // 4
        data.append(TokenizedExample(ids, [IGNORE_INDEX] * prompt + ids[prompt:], prompt))
    batches = list(epoch_batches(data, micro_batch=args.batch, world=1, rank=0, grad_accum=1, epoch=0, seed=0,
                                 pad_id=0, device=device))

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize(device)

    times, losses = [], []
    for i, batch in enumerate(batches):
        if i == args.warmup and on_gpu:
            torch.cuda.reset_peak_memory_stats(device)
        sync()
        start = time.perf_counter()
        out = engine(**batch)
        engine.backward(out["loss"])
        engine.step()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
        losses.append(float(out["loss"].detach()))
    tokens = args.batch * args.seq
    tokens_per_s = tokens / statistics.median(times)
    flops = train_flops_per_token(shape, depth, args.seq, extra_heads=len(exits))
    peak = args.peak_tflops or (peak_tflops(torch.cuda.get_device_name(device)) if on_gpu else None)
    result = {
        "device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
        "shape": args.shape, "layers": depth, "params": n_params, "exits": exits, "zero_stage": args.zero_stage,
        "grad_ckpt": not args.no_grad_ckpt, "chunk": args.chunk,
        "precision": "bf16", "offload_optimizer": args.offload_optimizer, "batch": args.batch, "seq": args.seq,
        "steps": args.steps, "setup_s": round(setup_s, 1),
        "step_s_median": statistics.median(times), "step_s_min": min(times),
        "tokens_per_s": tokens_per_s,
        "train_flops_per_token": flops, "peak_bf16_tflops": peak,
        "mfu": tokens_per_s * flops / (peak * 1e12) if peak else None,
        "peak_gpu_mem_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else None,
        "peak_gpu_mem_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if on_gpu else None,
        "gpu_total_gib": gpu_total / 2**30 if gpu_total else None,
        "loss_first_last": [losses[0], losses[-1]],
        "torch": torch.__version__, "deepspeed": deepspeed.__version__,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
