"""The prepared device check: LITE step, draft step and compiled decode of a LLaMA-2-7B shape on ONE GPU, one JSON.

Run (one H100 or H200, the project and its locked CUDA environment installed: the `layerexit:latest` image, or on a
lent machine `python3` with the wheels carried and `PYTHONPATH=platform`; about 8 minutes inside a 9-minute command):
    DS_ACCELERATOR=cuda .venv/bin/python benchmarks/gpu_check.py --budget-s 500 --out $OUT/gpu_check.json

Code-path check on a CPU (tiny LLaMA shape, the same code; about 1-2 minutes on 2 quiet cores, several when they
are shared; the numbers mean nothing):
    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check.json

Random weights throughout (timing depends on shapes, not on weights). Three parts, each in its own process (a fresh
CUDA context, so an out-of-memory or a hang costs only that part) under its own time budget; a part that fails or
runs out of time is recorded with its reason and the last lines of its log, and the next part still runs. ONE JSON
(``--out``) is rewritten after every part (and, inside a part, after every row), so a command killed at its limit
keeps what finished.

(a) ``lite``: the LITE training step (``benchmarks/gpu_zero3_7b.py``: the job's TrainConfig -> DeepSpeed config,
    optimizer, LiteObjective, batches; exits 8..28 + final) in the setting that the MFU sweep's own model favours.
    No sweep (``benchmarks/gpu_mfu_7b.py``) has run on a GPU yet, so the setting is chosen from the sweep's list by
    that model, not by a measurement: among the settings whose activations fit the headroom ``gpu_zero3_7b`` keeps
    beside 16 bytes per parameter, prefer ZeRO-2 (on one GPU ZeRO-3 shards nothing and only adds fetch hooks), then
    the most tokens per step (amortises the optimizer step and hooks), then the fewest model FLOPs per token: ZeRO-2,
    16 x 1024 tokens, head chunks of 512. If it fails, the next-ranked setting runs in what is left of the part's
    budget. The JSON names the ranking and the rule. Reports tokens/s and MFU (dense bf16 peak by device name). The
    depth follows gpu_zero3_7b's memory rule: 32 layers on an H200, 16 on an 80 GB H100 (16 bytes per parameter).
(b) ``draft``: one step of the frozen-base decoder-layer draft recipe (``recipe: adapters``, ``kind:
    decoder_layer``): settings from ``jobs/configs/llama2_7b_draft.yaml`` (``smollm2_draft.yaml`` with its exits
    scaled where that file is missing), ``build_decoder_adapters`` + ``DecoderAdapterObjective`` under the job's
    DeepSpeed config, teacher top-k rows from the frozen base's own final layer. All 32 layers (the base is frozen:
    bf16 weights only). Reports step time and tokens/s.
(c) ``engine``: our engine's ``final`` policy at batch 1 and 8 (128-token prompts, 64 new tokens): transformers
    ``generate``, the compiled engine (``engine/compiled.py``: ``torch.compile`` mode ``reduce-overhead``, CUDA
    graphs) and the eager engine, in that order, in one process. The compiled engine first runs a warm-up request
    of exactly the timed shapes (compiles, records); the timed request then counts its CUDA-graph recordings, each
    of which is a RE-record (every shape was recorded in the warm-up; the engine allocates a new KV cache per
    request, and CUDA graphs replay fixed addresses). torch exposes no public counter of recordings: they are
    counted by wrapping ``torch._inductor.cudagraph_trees.CUDAGraphTreeManager.record_function``; beside them the
    JSON has torch's own ``num_rerecord`` (re-records it calls unexpected), ``counters["inductor"]
    ["cudagraph_skips"]`` and dynamo's compiled graphs (``counters["stats"]["unique_graphs"]``: compiles and
    recompiles). On a CPU there are no CUDA graphs: the recording counts are 0.

``--fail PART`` makes PART raise (the test checks that it is recorded and that the others still report).
Exits 0 when every selected part reported, 1 otherwise; 2 when no GPU is visible without ``--dry-run``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from gpu_mfu_7b import SETTINGS_7B, SETTINGS_TINY, run_setting
from gpu_zero3_7b import HEADROOM_BYTES, SHAPES, exit_layers, pick_layers, train_flops_per_token

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PARTS = ("lite", "draft", "engine")
# Share of --budget-s each part may use. Deadlines are cumulative: time a part leaves unused goes to the next ones.
SHARES = {"lite": 0.24, "draft": 0.14, "engine": 0.62}  # engine: two compiles (batch 1, then 8) on a cold cache
DRAFT_CONFIG = REPO / "jobs" / "configs" / "llama2_7b_draft.yaml"
DRAFT_FALLBACK = REPO / "jobs" / "configs" / "smollm2_draft.yaml"
LITE_RULE = ("settings of benchmarks/gpu_mfu_7b.py ranked by its own model, no GPU measurement: activations "
             "(checkpointed layer inputs, one layer's recomputation, one head chunk, DeepSpeed buckets) within the "
             "headroom gpu_zero3_7b keeps beside 16 bytes/parameter; then ZeRO-2 before ZeRO-3 (one GPU: ZeRO-3 "
             "shards nothing, adds fetch hooks); then most tokens per step; then fewest model FLOPs per token")


# ============================================================================================ (a) LITE: choice


def activation_bytes(shape: dict, layers: int, batch: int, seq: int, chunk: int) -> int:
    """Rough GPU bytes of one LITE step beyond the model state (what ``HEADROOM_BYTES`` must hold): each layer's
    bf16 input kept by activation checkpointing, one layer's recomputed working set (attention projections and
    norms, ~6 x hidden; gate, up, activation and product, ~4 x intermediate; bf16), one head chunk's fp32 logits,
    softmax and gradient, and DeepSpeed's reduce and all-gather buckets (5e8 bf16 elements each)."""
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    tokens = batch * seq
    return layers * tokens * h * 2 + tokens * (6 * h + 4 * i) * 2 + 3 * chunk * v * 4 + 2 * 5 * 10**8 * 2


def rank_lite_settings(shape_name: str, gpu_bytes: int | None) -> list[dict]:
    """The MFU sweep's settings for ``shape_name``, best first by ``LITE_RULE`` (``gpu_bytes`` None: no GPU, the
    depth gpu_zero3_7b picks then and no memory filter)."""
    shape = SHAPES[shape_name]
    layers = pick_layers(shape, "auto", gpu_bytes)
    rows = []
    for stage, batch, seq, chunk in SETTINGS_7B if shape_name == "7b" else SETTINGS_TINY:
        act = activation_bytes(shape, layers, batch, seq, chunk)
        rows.append({"zero_stage": stage, "batch": batch, "seq": seq, "chunk": chunk, "layers": layers,
                     "tokens_per_step": batch * seq, "activation_gib_est": round(act / 2**30, 2),
                     "fits_headroom": gpu_bytes is None or act <= HEADROOM_BYTES,
                     "train_flops_per_token": train_flops_per_token(shape, layers, seq, len(exit_layers(layers)))})
    rows.sort(key=lambda r: (not r["fits_headroom"], r["zero_stage"] != 2, -r["tokens_per_step"],
                             r["train_flops_per_token"], -r["chunk"]))
    return rows


def lite_part(args: argparse.Namespace, timeout_s: float, machine: dict, emit: Callable[[dict], None]) -> dict:
    """Run the favoured LITE setting (``gpu_mfu_7b.run_setting``, its own process); if it fails, the next-ranked one
    (after an out-of-memory, the next with fewer tokens per step), at most 3 tries, while the part's time lasts."""
    if args.fail == "lite":
        raise RuntimeError("forced failure of part lite (--fail lite)")
    shape = "tiny" if args.dry_run else "7b"
    ranked = rank_lite_settings(shape, machine.get("gpu_bytes"))
    result: dict[str, Any] = {"choice": {"rule": LITE_RULE, "ranked": ranked}, "attempts": []}
    start, oom_tokens = time.perf_counter(), None
    for cand in ranked:
        left = timeout_s - (time.perf_counter() - start)
        if left < 20 or len(result["attempts"]) == 3:
            break
        if oom_tokens is not None and cand["tokens_per_step"] >= oom_tokens:
            continue  # as many tokens per step as one that ran out of memory
        os.environ["MASTER_PORT"] = str(free_port())  # run_setting passes os.environ to its process
        _progress(f"lite: ZeRO-{cand['zero_stage']} {cand['batch']}x{cand['seq']} chunk {cand['chunk']} "
                  f"({left:.0f} s left)")
        row = run_setting(shape, cand["zero_stage"], cand["batch"], cand["seq"], cand["chunk"], args.lite_steps, left)
        result["attempts"].append(row)
        emit(result)
        if row.get("error") == "out of memory":
            oom_tokens = min(oom_tokens or cand["tokens_per_step"], cand["tokens_per_step"])
        if "tokens_per_s" in row:
            result["setting"] = {k: cand[k] for k in ("zero_stage", "batch", "seq", "chunk")}
            result["setting"]["name"] = (f"ZeRO-{cand['zero_stage']} {cand['batch']}x{cand['seq']} "
                                         f"chunk {cand['chunk']}")
            result["setting"]["ranked_first"] = cand is ranked[0]
            for key in ("layers", "tokens_per_s", "mfu", "step_s_median", "train_flops_per_token", "peak_bf16_tflops",
                        "peak_gpu_mem_allocated_gib", "peak_gpu_mem_reserved_gib", "gpu_total_gib", "device",
                        "setup_s", "torch", "deepspeed"):
                result[key] = row.get(key)
            _progress(f"lite: {row['tokens_per_s']:.0f} tokens/s"
                      + (f", MFU {row['mfu']:.1%}" if row.get("mfu") is not None else ""))
            return result
    raise RuntimeError("no LITE setting ran: " + "; ".join(str(a.get("error")) for a in result["attempts"])[:600])


# ============================================================================================ (b) draft (child)


def scale_exits(exits: list[int], config_depth: int, depth: int) -> list[int]:
    """The config's exit layers on a model of ``depth`` layers (the same share of the depth, 1..depth-1)."""
    if config_depth == depth:
        return sorted(exits)
    return sorted({min(depth - 1, max(1, round(l * depth / config_depth))) for l in exits})


def draft_config(on_gpu: bool) -> tuple[Any, Path]:
    """The 7B draft recipe's TrainConfig (smollm2_draft.yaml where llama2_7b_draft.yaml is missing), made one rank
    on this device: the recipe's adapters, distillation, micro-batch, length and ZeRO stage are kept."""
    from layerexit.training.config import TrainConfig, load_train_config

    path = DRAFT_CONFIG if DRAFT_CONFIG.exists() else DRAFT_FALLBACK
    raw = load_train_config(path, check=False).model_dump()
    raw["scaling"].update(num_workers=1, use_gpu=on_gpu)
    raw["deepspeed"].update(precision="bf16", offload_optimizer=raw["deepspeed"]["offload_optimizer"] and on_gpu)
    raw["optim"].update(grad_accum=1, global_batch_size=None)
    return TrainConfig.model_validate(raw), path


def _single_rank(on_gpu: bool) -> None:
    """torch.distributed as one rank (what `deepspeed` or torchrun would set)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if on_gpu else "cpu")
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port())), ("RANK", "0"),
                       ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)


def draft_part(args: argparse.Namespace, emit: Callable[[dict], None]) -> dict:
    """Step time of the frozen-base decoder-layer draft recipe on the 7B shape (tiny with --dry-run)."""
    if args.fail == "draft":
        raise RuntimeError("forced failure of part draft (--fail draft)")
    import torch

    on_gpu = torch.cuda.is_available()
    _single_rank(on_gpu)
    import deepspeed

    from gpu_zero3_7b import random_model
    from layerexit.data.datasets import IGNORE_INDEX, TokenizedExample
    from layerexit.data.teacher_cache import response_positions
    from layerexit.losses import exit_weights
    from layerexit.losses.distill import teacher_topk
    from layerexit.models.adapters import build_decoder_adapters
    from layerexit.training.loop import epoch_batches, param_groups
    from layerexit.training.ray_trainer import build_optimizer, deepspeed_config
    from layerexit.training.recipes import DecoderAdapterObjective

    cfg, source = draft_config(on_gpu)
    shape_name = "tiny" if args.dry_run else "7b"
    shape, depth = SHAPES[shape_name], 4 if args.dry_run else 32
    exits = scale_exits(cfg.lite.exit_layers, cfg.model.num_layers or depth, depth)
    batch, seq = cfg.optim.micro_batch_size, 64 if args.dry_run else cfg.data.max_length
    result: dict[str, Any] = {"config": str(source.relative_to(REPO)), "exits": exits, "layers": depth,
                              "adapters": cfg.adapters.model_dump(), "zero_stage": cfg.deepspeed.zero_stage,
                              "batch": batch, "seq": seq, "top_k": cfg.distill.top_k}
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    t0 = time.perf_counter()
    model = random_model(shape, depth, device)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    adapters = build_decoder_adapters(model, exits, cfg.adapters.num_layers, cfg.adapters.init)
    objective = DecoderAdapterObjective(model, adapters, exit_weights(exits, depth, cfg.lite.weights),
                                        cfg.distill.temperature, cfg.distill.full_every, cfg.distill.chunk_size)
    optimizer = build_optimizer(cfg, param_groups(objective, cfg.optim.weight_decay))
    engine, *_ = deepspeed.initialize(model=objective, optimizer=optimizer, config=deepspeed_config(cfg))
    result["trainable_params"] = sum(p.numel() for p in objective.parameters() if p.requires_grad)
    result["setup_s"] = round(time.perf_counter() - t0, 1)

    # Random sequences (a quarter prompt), each with the teacher rows the cache would hold: the frozen base's own
    # final-layer top-k at every response position (computed here on the device, outside the timed steps).
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range((args.draft_warmup + args.draft_steps) * batch):
        ids = torch.randint(3, shape["vocab_size"], (seq,), generator=g).tolist()
        data.append(TokenizedExample(ids, [IGNORE_INDEX] * (seq // 4) + ids[seq // 4 :], seq // 4))
    with torch.no_grad():
        for start in range(0, len(data), batch):
            chunk = data[start : start + batch]
            logits = model(torch.tensor([e.input_ids for e in chunk], device=device)).logits
            for row, ex in enumerate(chunk):
                pos = response_positions(ex)
                t_ids, t_logp = teacher_topk(logits[row, pos], cfg.distill.top_k, cfg.distill.temperature)
                ex.teacher = (torch.tensor(pos, dtype=torch.int32), t_ids.int().cpu(), t_logp.float().cpu())
            del logits
    batches = list(epoch_batches(data, micro_batch=batch, world=1, rank=0, grad_accum=1, epoch=0, seed=0,
                                 pad_id=0, device=device))
    times, losses = [], []
    for i, b in enumerate(batches):
        if i == args.draft_warmup and on_gpu:
            torch.cuda.reset_peak_memory_stats(device)
        _sync(on_gpu)
        start = time.perf_counter()
        out = engine(**b)
        engine.backward(out["loss"])
        engine.step()
        _sync(on_gpu)
        if i >= args.draft_warmup:
            times.append(time.perf_counter() - start)
        losses.append(float(out["loss"].detach()))
    step = statistics.median(times)
    positions = sum(len(response_positions(e)) for e in data) / len(batches)
    result.update(step_s_median=step, step_s_min=min(times), steps=len(times), tokens_per_s=batch * seq / step,
                  trained_positions_per_s=positions / step, loss_first_last=[losses[0], losses[-1]],
                  device=torch.cuda.get_device_name(device) if on_gpu else "cpu",
                  peak_gpu_mem_allocated_gib=torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else None,
                  torch=torch.__version__, deepspeed=deepspeed.__version__)
    _progress(f"draft: {step:.3f} s per step, {batch * seq / step:.0f} tokens/s")
    return result


# ============================================================================================ (c) engine (child)


class GraphCounter:
    """CUDA-graph recordings (cudagraph trees) and dynamo graph compilations in this process, as a snapshot.

    torch has no public counter of recordings, so ``CUDAGraphTreeManager.record_function`` is wrapped (class-wide,
    this process only). If that private API is missing the recording counts stay 0 and ``note`` says why."""

    def __init__(self) -> None:
        self.recordings = 0
        self.note: str | None = None
        try:
            from torch._inductor import cudagraph_trees

            original = cudagraph_trees.CUDAGraphTreeManager.record_function
        except (ImportError, AttributeError) as err:
            self.note = f"recordings not counted: {type(err).__name__}: {err}"
            return

        def counted(manager, *a, **kw):
            self.recordings += 1
            return original(manager, *a, **kw)

        cudagraph_trees.CUDAGraphTreeManager.record_function = counted

    def snapshot(self) -> dict[str, int]:
        import torch
        from torch._dynamo.utils import counters

        unexpected = 0
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            try:
                from torch._inductor.cudagraph_trees import get_manager

                manager = get_manager(torch.cuda.current_device(), create_if_none_exists=False)
                if manager is not None:
                    unexpected = sum(sum(d.values()) for d in manager.num_rerecord.values())
            except Exception as err:  # noqa: BLE001 -- a private API: report, never fail the part
                self.note = f"num_rerecord not read: {type(err).__name__}: {err}"
        return {"recorded": int(self.recordings), "unexpected_rerecords": int(unexpected),
                "skips": int(counters["inductor"]["cudagraph_skips"]),
                "dynamo_graphs": int(counters["stats"]["unique_graphs"])}

    @staticmethod
    def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
        return {k: after[k] - before[k] for k in after}


def engine_part(args: argparse.Namespace, emit: Callable[[dict], None]) -> dict:
    """Decode tokens/s of transformers ``generate``, the compiled and the eager engine (``final``), batch 1 and 8."""
    if args.fail == "engine":
        raise RuntimeError("forced failure of part engine (--fail engine)")
    import torch

    counter = GraphCounter()  # before anything compiles
    from gpu_engine_7b import SEVEN_B, TINY, build, time_engine, time_hf
    from layerexit.engine.decode import EarlyExitEngine
    from layerexit.engine.options import ExitConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shape = TINY if args.dry_run else SEVEN_B
    new, prompt_len = (8, 16) if args.dry_run else (args.new_tokens, args.prompt_len)
    t0 = time.perf_counter()
    model = build(shape, device, dtype)
    result: dict[str, Any] = {"layers": shape["num_hidden_layers"], "dtype": str(dtype), "prompt_len": prompt_len,
                              "new_tokens": new, "policy": "final", "rows": [], "summary": {},
                              "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                              "torch": torch.__version__, "build_s": round(time.perf_counter() - t0, 1)}
    if device == "cuda":
        result["weights_gib"] = torch.cuda.memory_allocated() / 2**30
    engines = {"compiled": EarlyExitEngine(model, eos_token_ids={-1}, pad_token_id=0, compile=True),
               "eager": EarlyExitEngine(model, eos_token_ids={-1}, pad_token_id=0)}
    final = ExitConfig(policy="final")
    g = torch.Generator().manual_seed(1)
    for batch in args.batches:
        ids = torch.randint(3, shape["vocab_size"], (batch, prompt_len), generator=g)
        prompts = [row.tolist() for row in ids]
        ids = ids.to(device)
        time_hf(model, ids, 4, device)  # warm-up (kernels, allocator)
        hf_tps = batch * new / time_hf(model, ids, new, device)
        summary = result["summary"][f"batch_{batch}"] = {"hf_generate_tokens_per_s": hf_tps}
        result["rows"].append({"name": "hf-generate", "batch": batch, "tokens_per_s": hf_tps, "speedup": 1.0})
        emit(result)
        _progress(f"engine: batch {batch} hf-generate {hf_tps:.1f} tokens/s")
        for name, eng in engines.items():
            row: dict[str, Any] = {"name": f"{name}-final", "batch": batch}
            try:
                s0 = counter.snapshot()
                # Warm-up: compiled, the exact timed shapes (compiles and records every graph); eager, 4 tokens.
                time_engine(eng, prompts, final, new if eng.compiled is not None else 4, device)
                s1 = counter.snapshot()
                seconds, tokens, _ = time_engine(eng, prompts, final, new, device)
                s2 = counter.snapshot()
                row.update(tokens_per_s=tokens / seconds, speedup=tokens / seconds / hf_tps)
                if eng.compiled is not None:
                    warm, timed = counter.delta(s0, s1), counter.delta(s1, s2)
                    row.update(compile_seconds=eng.compiled.compile_seconds, compiled_off=eng.compiled.failed,
                               cuda_graph_recordings_warmup=warm["recorded"],
                               cuda_graph_rerecords_timed=timed["recorded"],
                               cuda_graph_unexpected_rerecords=warm["unexpected_rerecords"]
                               + timed["unexpected_rerecords"],
                               cuda_graph_skips=warm["skips"] + timed["skips"],
                               dynamo_graphs_warmup=warm["dynamo_graphs"], dynamo_graphs_timed=timed["dynamo_graphs"])
                    if counter.note:
                        row["counter_note"] = counter.note
                    summary.update(compiled_tokens_per_s=row["tokens_per_s"], compiled_speedup=row["speedup"],
                                   cuda_graph_rerecords_timed=timed["recorded"], compiled_off=eng.compiled.failed)
                else:
                    summary.update(eager_tokens_per_s=row["tokens_per_s"], eager_speedup=row["speedup"])
                if device == "cuda":
                    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                _progress(f"engine: batch {batch} {row['name']} {row['tokens_per_s']:.1f} tokens/s "
                          f"({row['speedup']:.2f}x generate)")
            except Exception as exc:  # noqa: BLE001 -- a row that cannot run is reported, the others still run
                row["error"] = f"{type(exc).__name__}: {exc}"[:400]
                traceback.print_exc()
            result["rows"].append(row)
            emit(result)
    return result


# ============================================================================================ running the parts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync(on_gpu: bool) -> None:
    if on_gpu:
        import torch

        torch.cuda.synchronize()


def _progress(message: str) -> None:
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


def write_json(path: Path, data: dict) -> None:
    """Atomic: a reader (or a kill) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def machine_info(dry_run: bool) -> dict:
    """The GPU (from nvidia-smi, so this process opens no CUDA context) and the host."""
    info: dict[str, Any] = {"python": platform.python_version(), "host_cpus": os.cpu_count(), "gpu": None,
                            "gpu_bytes": None}
    smi = shutil.which("nvidia-smi")
    if smi and not dry_run:
        try:
            out = subprocess.run([smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
            if out:
                name, mib = (x.strip() for x in out[0].split(","))
                info.update(gpu=name, gpu_bytes=int(float(mib)) * 2**20, gpus_visible=len(out))
        except (OSError, ValueError, subprocess.SubprocessError) as err:
            info["gpu_error"] = str(err)
    return info


def child_part(part: str, args: argparse.Namespace, timeout_s: float, emit: Callable[[dict], None]) -> dict:
    """Run ``part`` in a new process (``--part``) for at most ``timeout_s``; its partial result file is read back
    whatever happens, its log lines tagged [gpu_check] are shown, and the last 30 lines kept for errors."""
    with tempfile.TemporaryDirectory(prefix=f"gpu_check_{part}_") as tmp:
        part_out = Path(tmp) / "part.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part, "--part-out", str(part_out),
               "--batches", *map(str, args.batches), "--new-tokens", str(args.new_tokens),
               "--prompt-len", str(args.prompt_len), "--draft-steps", str(args.draft_steps),
               "--draft-warmup", str(args.draft_warmup)]
        if args.dry_run:
            cmd.append("--dry-run")
        if args.fail:
            cmd += ["--fail", args.fail]
        env = {**os.environ, "MASTER_PORT": str(free_port()), "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)  # its own process group: a timeout kills compile workers too
        tail: collections.deque[str] = collections.deque(maxlen=30)

        def pump() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                tail.append(line.rstrip())
                if line.startswith("[gpu_check]"):
                    print(line, end="", file=sys.stderr, flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        deadline, seen = time.monotonic() + max(1.0, timeout_s), 0.0
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(1.0)
            stamp = part_out.stat().st_mtime if part_out.exists() else 0.0
            if stamp != seen:  # the child finished a row: into the one JSON now, in case this command is killed
                seen = stamp
                try:
                    emit(json.loads(part_out.read_text()))
                except (OSError, ValueError):
                    pass
        timed_out = proc.poll() is None
        if timed_out:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        reader.join(timeout=10)
        result = json.loads(part_out.read_text()) if part_out.exists() else {}
        if timed_out:
            result.update(status="timeout", error=f"stopped at its time limit ({timeout_s:.0f} s); partial results "
                          "kept", log_tail=list(tail)[-15:])
        elif proc.returncode != 0:
            result.update(status="error", error=result.get("error") or f"exit status {proc.returncode}",
                          log_tail=list(tail)[-15:])
        else:
            result["status"] = "ok"
        return result


def child_main(args: argparse.Namespace) -> int:
    """One part in this process: the result (partial ones too) goes to --part-out; exit 1 on an exception."""
    out = Path(args.part_out)
    emit = lambda data: write_json(out, data)  # noqa: E731
    try:
        result = (draft_part if args.part == "draft" else engine_part)(args, emit)
    except Exception as exc:  # noqa: BLE001 -- recorded by the parent with the traceback's end
        traceback.print_exc()
        partial = json.loads(out.read_text()) if out.exists() else {}
        write_json(out, {**partial, "error": f"{type(exc).__name__}: {exc}"[:600]})
        return 1
    write_json(out, result)
    return 0


def summarize(parts: dict[str, dict]) -> dict:
    """The headline numbers of each part, for reading the JSON at a glance."""
    lite, draft, engine = parts.get("lite", {}), parts.get("draft", {}), parts.get("engine", {})
    return {
        "lite": {k: lite.get(k) for k in ("tokens_per_s", "mfu", "layers")} | {
            "setting": (lite.get("setting") or {}).get("name")},
        "draft": {k: draft.get(k) for k in ("step_s_median", "tokens_per_s", "exits")},
        "engine": engine.get("summary"),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the one JSON result (rewritten as parts "
                   "finish)")
    p.add_argument("--budget-s", type=float, help="total seconds for all parts (default 500; 1200 with --dry-run, "
                   "for a loaded CPU; shares: lite 24%%, draft 14%%, engine 62%%; unused time passes to the next "
                   "part)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny LLaMA shape, same code paths (numbers mean "
                   "nothing)")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of lite,draft,engine")
    p.add_argument("--fail", choices=PARTS, help="(testing) make this part raise; the others must still report")
    p.add_argument("--lite-steps", type=int, default=3, help="measured LITE steps (after 2 warm-up steps)")
    p.add_argument("--draft-steps", type=int, default=3, help="measured draft steps")
    p.add_argument("--draft-warmup", type=int, default=2, help="draft steps before measuring")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="engine batch sizes")
    p.add_argument("--new-tokens", type=int, default=64, help="engine: tokens generated per row (dry run: 8)")
    p.add_argument("--prompt-len", type=int, default=128, help="engine: prompt tokens per row (dry run: 16)")
    p.add_argument("--part", choices=("draft", "engine"), help=argparse.SUPPRESS)  # internal: run one part here
    p.add_argument("--part-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 1200.0 if args.dry_run else 500.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.part:
        return child_main(args)
    from tqdm import tqdm

    selected = [p for p in PARTS if p in {x.strip() for x in args.parts.split(",")}]
    machine = machine_info(args.dry_run)
    if not args.dry_run and machine["gpu"] is None:
        print("error: no NVIDIA GPU visible (nvidia-smi); on a CPU run the code paths with --dry-run",
              file=sys.stderr)
        return 2
    report: dict[str, Any] = {
        "benchmark": "gpu_check", "dry_run": args.dry_run, "shape": "tiny" if args.dry_run else "llama2-7b",
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "budget_s": args.budget_s,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine,
        "parts": {p: {"status": "pending" if p in selected else "skipped"} for p in PARTS}, "finished": False,
    }
    write_json(args.out, report)
    t0 = time.perf_counter()
    share_sum = 0.0
    bar = tqdm(selected, desc="gpu_check", unit="part", file=sys.stderr)
    for part in bar:
        bar.set_postfix_str(part)
        share_sum += SHARES[part] / sum(SHARES[p] for p in selected)
        timeout = args.budget_s * share_sum - (time.perf_counter() - t0)
        start = time.perf_counter()
        record = report["parts"][part]
        if timeout < (5 if args.dry_run else 30):
            record.update(status="not run", error=f"budget: {timeout:.0f} s left of its share")
            continue
        record.update(status="running", budget_s=round(timeout, 1))

        def emit(data: dict, record: dict = record) -> None:
            record.update(data)
            write_json(args.out, report)

        try:
            if part == "lite":
                result = {**lite_part(args, timeout, machine, emit), "status": "ok"}
            else:
                result = child_part(part, args, timeout, emit)
        except Exception as exc:  # noqa: BLE001 -- recorded; the next part still runs
            result = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:600],
                      "log_tail": traceback.format_exc().splitlines()[-8:]}
        record.update(result, wall_s=round(time.perf_counter() - start, 1))
        if record["status"] != "ok":
            _progress(f"{part}: {record['status']}: {record.get('error')}")
        report["summary"] = summarize(report["parts"])
        write_json(args.out, report)
    report.update(finished=True, wall_s=round(time.perf_counter() - t0, 1), summary=summarize(report["parts"]))
    write_json(args.out, report)
    print(json.dumps(report["summary"], default=str))
    print(f"[gpu_check] wrote {args.out}", file=sys.stderr)
    return 0 if all(report["parts"][p]["status"] == "ok" for p in selected) else 1


if __name__ == "__main__":
    sys.exit(main())
