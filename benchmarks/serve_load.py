"""Load test of the Serve application on loopback: N concurrent streaming clients, `final` vs an early-exit
config in the same run, same server, same prompts.

Run:  .venv/bin/python benchmarks/serve_load.py --model smollm2 --concurrency 8 --duration 30 --max-tokens 48

The server starts in-process (local Ray, Serve on 127.0.0.1, a free port) with the early-exit config as its
default (user_config); the `final` phase overrides it per request (`early_exit: {"policy": "final"}`), so
thresholds files work too (`--early-exit '{"policy": "confidence", "thresholds": "path/thresholds.yaml"}'`).
Each phase runs `--duration` seconds of closed-loop clients (a client sends its next request when the last
one ends; nothing new starts after the deadline, in-flight requests finish). Reports requests/s, tokens/s,
p50/p95 latency and time to first token, mean exit layer, FLOPs vs full depth, and early/final ratios.
Results go to --out as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

from layerexit.localhost import free_port as _free_port

DEFAULT_EARLY = {"policy": "confidence", "thresholds": "paper-7b", "kv": "recompute"}


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def _one(client, model: str, prompt: str, max_tokens: int, extra: dict | None) -> dict:
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    stats = None
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body=extra)
    async for chunk in stream:
        if chunk.choices:
            if ttft is None and chunk.choices[0].delta.content:
                ttft = time.perf_counter() - t0
            if chunk.choices[0].finish_reason:
                stats = (chunk.model_extra or {}).get("early_exit")
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    latency = time.perf_counter() - t0
    return {"latency": latency, "ttft": ttft if ttft is not None else latency, "tokens": tokens, "stats": stats}


async def run_phase(base_url: str, model: str, prompts: list[str], concurrency: int, duration: float,
                    max_tokens: int, extra: dict | None) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600)
    results: list[dict] = []
    errors: list[str] = []
    start = time.perf_counter()
    deadline = start + duration

    async def worker(i: int) -> None:
        n = i
        while time.perf_counter() < deadline:
            try:
                results.append(await _one(client, model, prompts[n % len(prompts)], max_tokens, extra))
            except Exception as err:  # noqa: BLE001 - counted and reported
                errors.append(f"{type(err).__name__}: {err}")
            n += concurrency

    try:
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    finally:
        await client.close()
    return {"results": results, "errors": errors, "wall": time.perf_counter() - start}


def summarize(runs: list[dict]) -> dict:
    """Pool the requests of several runs of one phase (interleaved rounds)."""
    results = [r for run in runs for r in run["results"]]
    errors = [e for run in runs for e in run["errors"]]
    wall = sum(run["wall"] for run in runs)
    lat = [r["latency"] for r in results]
    ttft = [r["ttft"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    layers = [(r["stats"]["mean_exit_layer"], r["tokens"]) for r in results if r["stats"] and r["tokens"]]
    flops = sum(r["stats"]["flops"] for r in results if r["stats"])
    flops_full = sum(r["stats"]["flops_full"] for r in results if r["stats"])
    batch = [r["stats"]["batch_size"] for r in results if r["stats"]]
    return {
        "requests": len(results), "errors": len(errors), "error_samples": errors[:3], "wall_s": round(wall, 2),
        "requests_per_s": len(results) / wall, "tokens_per_s": tokens / wall, "tokens": tokens,
        "latency_p50_s": _pct(lat, 0.5), "latency_p95_s": _pct(lat, 0.95),
        "ttft_p50_s": _pct(ttft, 0.5), "ttft_p95_s": _pct(ttft, 0.95),
        "mean_exit_layer": sum(m * t for m, t in layers) / max(1, sum(t for _, t in layers)),
        "flops_vs_full": flops / flops_full if flops_full else float("nan"),
        "mean_batch_size": statistics.mean(batch) if batch else float("nan"),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="model spec (smollm2, HF dir, .gguf, models:/name@alias)")
    parser.add_argument("--early-exit", default=json.dumps(DEFAULT_EARLY),
                        help="JSON exit config for the early-exit phase (the server's user_config)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per phase (closed loop)")
    parser.add_argument("--rounds", type=int, default=2, help="final/early-exit alternations; each gets "
                        "duration/rounds seconds")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--max-batch-size", type=int, default=None, help="default: --concurrency")
    parser.add_argument("--max-concurrent-batches", type=int, default=2,
                        help="server arg: batches decoded at once (1 = pure dynamic batching)")
    parser.add_argument("--no-continuous", action="store_true",
                        help="server arg continuous_batching=false: requests never join a running batch")
    parser.add_argument("--prompts", type=int, default=16, help="distinct prompts (builtin instructions)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="server arg dtype (default: the server's)")
    parser.add_argument("--compile", action="store_true", help="server arg compile=true (torch.compile'd decode "
                        "steps; the warm-up requests compile the common graphs before timing)")
    parser.add_argument("--out", default="outputs/bench/serve_load.json")
    args = parser.parse_args(argv)
    early = json.loads(args.early_exit)

    import ray
    from ray import serve

    from layerexit.data.prompts import builtin_prompts_path, read_prompts
    from layerexit.serving.app import build_app

    prompts = [p.prompt for p in read_prompts(builtin_prompts_path("instructions.jsonl"), limit=args.prompts)]
    t0 = time.time()
    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    cpus = max(1, int(ray.available_resources().get("CPU", 1)))
    port = _free_port()
    base = f"http://127.0.0.1:{port}/v1"
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({
            "model": args.model, "model_name": "bench", "user_config": early, "torch_threads": cpus,
            "max_batch_size": args.max_batch_size or args.concurrency,
            "max_concurrent_batches": args.max_concurrent_batches, "max_tokens_limit": max(args.max_tokens, 16),
            "continuous_batching": not args.no_continuous,
            "default_max_tokens": min(16, args.max_tokens), "request_timeout_s": 600,
            **({"dtype": args.dtype} if args.dtype else {}), **({"compile": True} if args.compile else {}),
            "deployment_options": {"ray_actor_options": {"num_cpus": cpus},
                                   "max_ongoing_requests": max(32, 2 * args.concurrency)},
        }), name="bench", route_prefix="/")
        setup_s = time.time() - t0
        # warm-up: one short request per config (with --compile, a full-length one at the clients' concurrency, so
        # the graphs for batch 1 and batch > 1 compile before timing)
        clients, seconds, tokens = (args.concurrency, 2.0, args.max_tokens) if args.compile else (1, 0.01, 4)
        for extra in (None, {"early_exit": {"policy": "final"}}):
            asyncio.run(run_phase(base, "bench", prompts[:clients], clients, seconds, tokens, extra))
        runs: dict[str, list[dict]] = {"final": [], "early_exit": []}
        for _ in range(args.rounds):  # interleaved, so load drifts on a shared machine hit both phases alike
            for name, extra in (("final", {"early_exit": {"policy": "final"}}), ("early_exit", None)):
                runs[name].append(asyncio.run(run_phase(base, "bench", prompts, args.concurrency,
                                                        args.duration / args.rounds, args.max_tokens, extra)))
        phases = {name: summarize(r) for name, r in runs.items()}
    finally:
        serve.shutdown()
        ray.shutdown()
    f, e = phases["final"], phases["early_exit"]
    report = {
        "command": "benchmarks/serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model, "early_exit_config": early, "concurrency": args.concurrency,
        "dtype": args.dtype, "compile": args.compile,
        "duration_s": args.duration, "rounds": args.rounds, "max_tokens": args.max_tokens,
        "max_concurrent_batches": args.max_concurrent_batches, "continuous_batching": not args.no_continuous,
        "cpus": cpus, "setup_s": round(setup_s, 1),
        "phases": phases,
        "ratios_early_over_final": {
            "tokens_per_s": e["tokens_per_s"] / f["tokens_per_s"] if f["tokens_per_s"] else float("nan"),
            "requests_per_s": e["requests_per_s"] / f["requests_per_s"] if f["requests_per_s"] else float("nan"),
            "latency_p50": e["latency_p50_s"] / f["latency_p50_s"],
            "ttft_p50": e["ttft_p50_s"] / f["ttft_p50_s"],
            "flops_vs_full": e["flops_vs_full"],
        },
    }
    _print(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return report


def _print(report: dict) -> None:
    cols = ("requests", "errors", "requests_per_s", "tokens_per_s", "latency_p50_s", "latency_p95_s", "ttft_p50_s",
            "ttft_p95_s", "mean_exit_layer", "flops_vs_full", "mean_batch_size")
    print(f"model={report['model']} concurrency={report['concurrency']} duration={report['duration_s']}s "
          f"max_tokens={report['max_tokens']} cpus={report['cpus']} early_exit={json.dumps(report['early_exit_config'])}")
    print(f"{'phase':<12}" + "".join(f"{c:>16}" for c in cols))
    for name, ph in report["phases"].items():
        print(f"{name:<12}" + "".join(f"{ph[c]:>16.3f}" if isinstance(ph[c], float) else f"{ph[c]:>16}"
                                      for c in cols))
    print("early/final: " + ", ".join(f"{k}={v:.3f}" for k, v in report["ratios_early_over_final"].items()))


if __name__ == "__main__":
    main()
