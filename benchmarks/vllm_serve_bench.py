"""Lossless serving over HTTP, side by side: vLLM (``.venv-vllm``, Ray Serve LLM) without a draft, with n-gram
drafting, with early-exit drafts (the base model's, a trained model's) and with an EAGLE-3 feature draft (vLLM's
``method: eagle3``), and our engine's compiled ``final`` and its lossless drafting, on the same held-out prompts, at
several client concurrencies, in one run.

Run (main venv; ``make vllm-env`` first):

    .venv/bin/python benchmarks/vllm_serve_bench.py --trained /path/to/trained/hf_model \\
        --concurrency 1,4,16 --duration 20 --max-tokens 32
    # vLLM with the registered EAGLE-3 draft against vLLM without a draft, same run:
    .venv/bin/python benchmarks/vllm_serve_bench.py --rows vllm-final,vllm-eagle3 \\
        --eagle3 models:/layerexit-smollm2_eagle3@trained --concurrency 1,4

``--eagle3`` is a model that carries an EAGLE-3 draft (served as the model, ``draft: shipped``) or an exported EAGLE-3
draft (``layerexit export-draft``: served as ``--model``'s draft); its draft length is the one it ships unless
``--eagle3-k``. Its LLaMA-2-7B prediction prices one EAGLE-3 layer (``fc`` over 3 aux layers, attention over 2 x
hidden, MLP, a head pruned in the same proportion) under the same weight-bytes model.

Each server runs alone on the machine (one vLLM cluster at a time, then our engine), greedy, the same dtype
(``--dtype``, default float32: drafting is then exact on both engines). A phase is ``--duration`` seconds of
closed-loop streaming clients (``benchmarks/serve_load.py``'s), after one untimed request per client (our engine
compiles its graphs then). Reported per row and concurrency: tokens/s, p50/p95 latency, p50 time to first token,
and acceptance: vLLM's from its speculative-decoding counters on Ray's Prometheus export (accepted / draft tokens;
tokens per verification = 1 + accepted / drafts), ours from each response's exit-layer histogram (tokens emitted at
the draft layer are accepted drafts; one token per step comes from the final layer). Next to each draft row, the
speedup its measured tokens-per-verification predicts for LLaMA-2-7B on a GPU under the weight-bytes cost model
(``tuning/draft_choice.py``), taking the draft at the same relative depth. Everything goes to an MLflow run
(experiment ``layerexit-bench``: metrics ``<row>.c<N>.<metric>``, the JSON, a PNG) and to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import _free_port, run_phase, summarize  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VLLM_CONFIG = REPO / "serve_configs" / "smollm2_vllm.yaml"
ROWS = ("vllm-final", "vllm-ngram", "vllm-draft-base", "vllm-draft-trained", "vllm-eagle3", "ours-final", "ours-ngram",
        "ours-draft-trained")
OURS_REQUESTS = {
    "ours-final": {"policy": "final"},
    # prompt lookup: the best lossless configuration for the untrained model (docs/benchmarks.md)
    "ours-ngram": {"policy": "self-speculative", "draft": "ngram", "num_draft": 3},
    # the draft the trained model ships (draft_settings.json: layer, draft length, draft vocabulary)
    "ours-draft-trained": {"policy": "self-speculative"},
}


def _export_draft(model: str, layer: int | None, out: Path) -> dict:
    """``layerexit export-draft`` (main venv), once per model and layer."""
    info_path = out / "layerexit_draft.json"
    if info_path.exists():
        return json.loads(info_path.read_text())
    cmd = [str(Path(sys.executable).with_name("layerexit")), "export-draft", model, "--out", str(out),
           "--measure", "0", "--no-register"] + (["--layer", str(layer)] if layer is not None else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"export-draft failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    return json.loads(info_path.read_text())


def _closed_loop(base_url: str, model: str, prompts: list[str], concurrency: int, duration: float,
                 max_tokens: int, extra: dict | None) -> dict:
    asyncio.run(run_phase(base_url, model, prompts[:concurrency], concurrency, 0.01, max_tokens, extra))  # warm-up
    return asyncio.run(run_phase(base_url, model, prompts, concurrency, duration, max_tokens, extra))


def _settled_counters(cluster, wait_s: float = 3.0) -> dict[str, float]:
    """Counters once they stop moving (Ray exports them every second)."""
    last = cluster.spec_counters()
    for _ in range(10):
        time.sleep(wait_s)
        now = cluster.spec_counters()
        if now == last:
            return now
        last = now
    return last


def run_vllm_row(row: str, draft: str | None, k: int, args, prompts: list[str], tmp: Path,
                 model: str | None = None) -> dict:
    from layerexit.serving.vllm_cluster import VllmCluster

    config = yaml.safe_load(VLLM_CONFIG.read_text())
    config["http_options"]["request_timeout_s"] = 900
    app = config["applications"][0]
    app["args"].update(model=_absolute(model or args.model), draft=_absolute(draft) if draft else "none",
                       dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=max(args.concurrency))
    app["args"].pop("num_draft", None)
    if args.compile:
        app["args"]["enforce_eager"] = False
    if draft:
        app["args"]["num_draft"] = k
    with VllmCluster(tmp / row) as cluster:
        try:
            start_s = cluster.serve_and_wait(config, timeout=1200 if args.compile else 360)
        except (RuntimeError, TimeoutError) as err:
            raise SystemExit(f"{row}: vLLM did not come up: {err}\n{cluster.logs()}") from None
        from layerexit.serving.vllm_config import served_name_for

        model = app["args"].get("model_name") or served_name_for(app["args"]["model"])
        out = {"setup_s": round(start_s, 1), "model": app["args"]["model"], "draft": draft,
               "num_speculative_tokens": k if draft else 0, "by_concurrency": {}}
        for c in args.concurrency:
            before = _settled_counters(cluster, 1.0) if draft else {}
            res = _closed_loop(cluster.base + "/v1", model, prompts, c, args.duration, args.max_tokens, None)
            summary = summarize([res])
            if draft:
                after = _settled_counters(cluster)
                d = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in ("accepted_tokens", "draft_tokens",
                                                                                  "drafts")}
                # the warm-up requests are in the delta too: same prompts, same draft, so the rates hold
                summary["acceptance"] = d["accepted_tokens"] / d["draft_tokens"] if d["draft_tokens"] else 0.0
                summary["tokens_per_verification"] = 1 + d["accepted_tokens"] / d["drafts"] if d["drafts"] else 1.0
                summary["spec_counters"] = d
            out["by_concurrency"][str(c)] = summary
            print(f"{row} c={c}: {_line(summary)}", flush=True)
    return out


def run_ours(rows: list[str], model: str, layers: int, args, prompts: list[str]) -> dict[str, dict]:
    """One server (our engine, compiled), every ``ours-*`` row as a per-request ``early_exit`` override."""
    import ray
    from ray import serve

    from layerexit.serving.app import build_app

    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    cpus = max(1, int(ray.available_resources().get("CPU", 1)))
    port = _free_port()
    base = f"http://127.0.0.1:{port}/v1"
    out: dict[str, dict] = {}
    try:
        t0 = time.time()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({
            "model": model, "model_name": "bench", "torch_threads": cpus, "dtype": args.dtype, "compile": True,
            "max_batch_size": max(args.concurrency), "max_concurrent_batches": 1, "continuous_batching": True,
            "max_tokens_limit": max(args.max_tokens, 16), "default_max_tokens": min(16, args.max_tokens),
            "request_timeout_s": 900,
            "user_config": {"policy": "final", "kv": "recompute"},
            "deployment_options": {"ray_actor_options": {"num_cpus": cpus},
                                   "max_ongoing_requests": max(32, 2 * max(args.concurrency))},
        }), name="bench", route_prefix="/")
        setup_s = time.time() - t0
        for row in rows:
            req = OURS_REQUESTS[row]
            out[row] = {"setup_s": round(setup_s, 1), "request": req, "by_concurrency": {}}
            for c in args.concurrency:
                res = _closed_loop(base, "bench", prompts, c, args.duration, args.max_tokens, {"early_exit": req})
                summary = summarize([res])
                # accepted n-gram tokens are reported at the final layer: the histogram cannot count them
                if req["policy"] == "self-speculative" and req.get("draft", "layer") != "ngram":
                    summary.update(_our_acceptance(res["results"], layers, req, model))
                out[row]["by_concurrency"][str(c)] = summary
                print(f"{row} c={c}: {_line(summary)}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


def _our_acceptance(results: list[dict], layers: int, req: dict, model: str) -> dict:
    """From the responses' exit-layer histograms: tokens below the final layer are accepted drafts, one per step
    comes from the final layer. Draft tokens proposed per step: the request's (or shipped) draft length."""
    accepted = steps = 0
    for r in results:
        hist = (r["stats"] or {}).get("exit_layer_histogram") or {}
        steps += hist.get(str(layers), 0)
        accepted += sum(n for layer, n in hist.items() if int(layer) != layers)
    k = req.get("num_draft") or _shipped(model).get("num_draft", 1)
    return {"acceptance": accepted / (steps * k) if steps else 0.0,
            "tokens_per_verification": (accepted + steps) / steps if steps else 1.0,
            "num_draft": k}


def _shipped(model: str) -> dict:
    path = Path(model) / "draft_settings.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _line(s: dict) -> str:
    acc = f", acceptance {s['acceptance']:.3f}, {s['tokens_per_verification']:.2f} tok/verify" if "acceptance" in s else ""
    return (f"{s['tokens_per_s']:.2f} tok/s, p50 {s['latency_p50_s']:.2f} s, p95 {s['latency_p95_s']:.2f} s, "
            f"ttft p50 {s['ttft_p50_s']:.2f} s, {s['requests']} requests, {s['errors']} errors{acc}")


def eagle3_llama_cost_ratio(draft_vocab_share: float, num_aux: int = 3, num_layers: int = 32, hidden: int = 4096,
                            intermediate: int = 11008, vocab: int = 32000, kv_heads_ratio: float = 1.0) -> float:
    """Weight bytes one EAGLE-3 draft token reads on a LLaMA shape (default LLaMA-2-7B) over a full step's: ``fc``
    (num_aux x hidden -> hidden), one decoder layer whose q/k/v read 2 x hidden, its MLP, and a head of
    ``draft_vocab_share`` of the vocabulary; the embedding row it reads is negligible. Same model as
    ``tuning.draft_choice.llama_shape_cost_ratio``."""
    one = hidden * hidden * (2 + 2 * kv_heads_ratio) + 3 * hidden * intermediate
    head = vocab * hidden
    draft_attn = 2 * hidden * hidden * (1 + 2 * kv_heads_ratio) + hidden * hidden  # q, k, v over 2H; o
    draft = num_aux * hidden * hidden + draft_attn + 3 * hidden * intermediate + draft_vocab_share * head
    return draft / (num_layers * one + head)


def predict_7b(report: dict, smol_layers: int) -> None:
    """Per draft row: the LLaMA-2-7B speedup its measured tokens per verification predicts (same relative depth;
    an EAGLE-3 draft: one EAGLE-3 layer with the same draft-vocabulary share)."""
    from layerexit.tuning.draft_choice import llama_shape_cost_ratio

    for row, res in report["rows"].items():
        layer = res.get("draft_layer")
        k = res.get("num_speculative_tokens") or res.get("num_draft")
        first = res["by_concurrency"].get("1", {})
        if k and "tokens_per_verification" in first and res.get("eagle3"):
            e3 = res["eagle3"]
            c = eagle3_llama_cost_ratio(e3["draft_vocab_size"] / e3["vocab_size"], num_aux=len(e3["aux_layers"]))
            res["llama2_7b_prediction"] = {"draft": "eagle3", "cost_ratio": round(c, 4), "num_draft": k,
                                           "speedup": round(first["tokens_per_verification"] / (k * c + 1), 3)}
            continue
        if not layer or not k or "tokens_per_verification" not in first:
            continue
        layer_7b = max(1, round(layer * 32 / smol_layers))
        c = llama_shape_cost_ratio(layer_7b, adapter_layers=res.get("adapter_layers", 0))
        res["llama2_7b_prediction"] = {"layer": layer_7b, "cost_ratio": round(c, 4), "num_draft": k,
                                       "speedup": round(first["tokens_per_verification"] / (k * c + 1), 3)}


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for row, res in report["rows"].items():
        cs = sorted(res["by_concurrency"], key=int)
        ax.plot([int(c) for c in cs], [res["by_concurrency"][c]["tokens_per_s"] for c in cs], marker="o", label=row)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("tokens/s")
    ax.set_title(f"Lossless serving over HTTP ({report['dtype']}, {report['max_tokens']} tokens)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="the base model (vLLM rows and our engine)")
    parser.add_argument("--trained", default=None, help="a trained model (HF dir with exit adapters and "
                        "draft_settings.json): the trained-draft rows; our engine then serves it (its final layer "
                        "is the base model's)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    parser.add_argument("--base-draft-layer", type=int, default=24, help="layer of the base model's draft")
    parser.add_argument("--num-draft", type=int, default=3, help="k for the base and n-gram drafts "
                        "(the trained draft uses the k it ships with)")
    parser.add_argument("--eagle3", default=None, help="the vllm-eagle3 row: a model carrying an EAGLE-3 draft "
                        "(models:/layerexit-smollm2_eagle3@trained or its directory; served with draft: shipped) or an "
                        "exported EAGLE-3 draft (directory or models:/ URI; served as --model's draft)")
    parser.add_argument("--eagle3-k", type=int, default=None, help="draft length of the vllm-eagle3 row (default: "
                        "the one it ships)")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per phase (closed loop)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompts", default=None, help="JSONL prompts (default: the held-out instructions)")
    parser.add_argument("--limit", type=int, default=16, help="distinct prompts")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--compile", action="store_true", help="let vLLM compile (torch.compile; starts in 3-6 min on "
                        "a CPU) instead of the config's enforce_eager")
    parser.add_argument("--drafts-dir", default="outputs/bench/drafts", help="where exported drafts are kept")
    parser.add_argument("--experiment", default="layerexit-bench")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--out", default="outputs/bench/vllm_serve_bench.json")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the clusters' `with` blocks stop them
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"--rows: unknown {unknown}; choose from {', '.join(ROWS)}")
    if any(r.endswith("trained") for r in rows) and not args.trained:
        parser.error("--rows has trained-draft rows: pass --trained MODEL_DIR (or drop them from --rows)")
    if "vllm-eagle3" in rows and not args.eagle3:
        parser.error("--rows has vllm-eagle3: pass --eagle3 MODEL_OR_DRAFT (or drop it from --rows)")

    from layerexit import tracking
    from layerexit.data.instructions import heldout_instructions
    from layerexit.data.prompts import read_prompts
    from layerexit.machine import describe_machine, machine_line
    from layerexit.models.loading import resolve_model

    prompts = ([p.prompt for p in read_prompts(args.prompts, limit=args.limit)] if args.prompts
               else [it.text for it in heldout_instructions()[: args.limit]])
    base_path = resolve_model(args.model).location
    smol_layers = json.loads((Path(base_path) / "config.json").read_text())["num_hidden_layers"]
    drafts = Path(args.drafts_dir).expanduser().resolve()  # vLLM resolves paths from its own cwd
    report: dict = {"command": "benchmarks/vllm_serve_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "machine": machine_line(describe_machine()), "dtype": args.dtype, "max_tokens": args.max_tokens,
                    "vllm_compiled": args.compile,
                    "duration_s": args.duration, "prompts": len(prompts), "concurrency": args.concurrency, "rows": {}}
    print(report["machine"], flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="vllm-bench-"))
    k = args.num_draft
    for row in [r for r in rows if r.startswith("vllm-")]:
        draft, draft_info, row_k, row_model, extra = None, {}, 0, None, {}
        if row == "vllm-ngram":
            draft, row_k = "ngram", k
        elif row == "vllm-draft-base":
            out = drafts / f"{Path(base_path).name}-l{args.base_draft_layer}"
            draft_info = _export_draft(args.model, args.base_draft_layer, out)
            draft, row_k = str(out), k
        elif row == "vllm-draft-trained":
            shipped = _shipped(args.trained)
            out = drafts / f"trained-{Path(args.trained).resolve().parent.name}-l{shipped.get('layer', 'x')}"
            draft_info = _export_draft(args.trained, None, out)
            draft, row_k = str(out), int(shipped.get("num_draft", k))
        elif row == "vllm-eagle3":
            row_model, draft, row_k, extra = _eagle3_source(args)
        try:
            res = run_vllm_row(row, draft, row_k, args, prompts, tmp, model=row_model)
        except SystemExit as err:  # one row's failure is reported; the other rows still run
            print(f"{row}: failed: {err}", flush=True)
            res = {"error": str(err)[-2000:], "by_concurrency": {}}
        if draft_info:
            res.update(draft_layer=draft_info["layer"],
                       adapter_layers=draft_info["num_layers"] - draft_info["layer"])
        res.update(extra)
        report["rows"][row] = res
        _save(report, args.out)  # a later failure keeps what was measured
    ours = [r for r in rows if r.startswith("ours-")]
    if ours:
        model = args.trained or base_path
        for row, res in run_ours(ours, model, smol_layers, args, prompts).items():
            if row == "ours-draft-trained":
                shipped = _shipped(args.trained)
                res.update(draft_layer=shipped.get("layer"), num_draft=shipped.get("num_draft"),
                           adapter_layers=_adapter_layers(args.trained))
            report["rows"][row] = res
    predict_7b(report, smol_layers)
    _print(report)
    out = _save(report, args.out)
    png = out.with_suffix(".png")
    _plot(report, png)
    with tracking.tracked_run(args.experiment, run_name="vllm-serve-bench", tracking_uri=args.tracking_uri,
                              tags={"layerexit.job": "vllm_serve_bench", "layerexit.machine": report["machine"]}) as run:
        run.log_params({"dtype": args.dtype, "max_tokens": args.max_tokens, "duration_s": args.duration,
                        "prompts": len(prompts), "rows": ",".join(rows), "trained": args.trained or ""})
        metrics = {}
        for row, res in report["rows"].items():
            for c, s in res["by_concurrency"].items():
                for key in ("tokens_per_s", "latency_p50_s", "latency_p95_s", "ttft_p50_s", "acceptance",
                            "tokens_per_verification"):
                    if key in s:
                        metrics[f"{row}.c{c}.{key}"] = s[key]
            if "llama2_7b_prediction" in res:
                metrics[f"{row}.llama2_7b_predicted_speedup"] = res["llama2_7b_prediction"]["speedup"]
        run.log_metrics(metrics)
        run.log_dict(report, "vllm_serve_bench.json")
        run.log_artifact(str(png))
    print(f"wrote {out} and {png}; MLflow run {run.run_id}")
    return report


def _absolute(spec: str) -> str:
    """A local path made absolute (the Serve app resolves specs from its cluster's own directory); others as given."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def _eagle3_source(args) -> tuple[str, str, int, dict]:
    """(model, draft, k, row info) of the vllm-eagle3 row: a model carrying an EAGLE-3 draft is served with
    ``draft: shipped``, an exported EAGLE-3 draft as ``--model``'s; both checked as the Serve backend checks them."""
    from layerexit.errors import LayerexitError
    from layerexit.models.eagle3_export import carried_eagle3, is_eagle3_checkpoint
    from layerexit.serving.vllm_config import parse_vllm_args, resolve_sources, resolve_spec

    try:
        local, _ = resolve_spec(args.eagle3, "--eagle3")
        if Path(local).is_dir() and carried_eagle3(local) is not None:
            model, draft = args.eagle3, "shipped"
        elif is_eagle3_checkpoint(local):
            model, draft = args.model, args.eagle3
        else:
            raise SystemExit(f"--eagle3 {args.eagle3}: neither carries an EAGLE-3 draft nor is one")
        sources = resolve_sources(parse_vllm_args({"model": model, "draft": draft, "device": "cpu",
                                                   "num_draft": args.eagle3_k}, "--eagle3"))
    except LayerexitError as err:
        raise SystemExit(f"--eagle3: {err}") from None
    config = json.loads((Path(sources.draft) / "config.json").read_text())
    info = {"eagle3": {"source": args.eagle3, "draft_dir": sources.draft, "vocab_size": config["vocab_size"],
                       "draft_vocab_size": config.get("draft_vocab_size", config["vocab_size"]),
                       "aux_layers": config.get("eagle_config", {}).get("eagle_aux_hidden_state_layer_ids", [])}}
    return model, draft, int(sources.num_draft), info


def _save(report: dict, path: str) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return out


def _adapter_layers(model: str) -> int:
    path = Path(model) / "exit_adapters" / "adapters.json"
    if not path.exists():
        return 0
    meta = json.loads(path.read_text())
    return int(meta.get("adapter_layers", 0)) if meta.get("kind") == "decoder_layer" else 0


def _print(report: dict) -> None:
    print(f"\n{report['machine']}; {report['prompts']} held-out prompts x {report['max_tokens']} tokens, "
          f"{report['dtype']}, {report['duration_s']} s per phase")
    cs = [str(c) for c in report["concurrency"]]
    print(f"{'row':<20}" + "".join(f"{'c=' + c + ' tok/s':>13}{'p50 s':>8}{'ttft':>7}" for c in cs)
          + f"{'accept':>8}{'tok/ver':>8}{'7B pred':>9}")
    for row, res in report["rows"].items():
        line = f"{row:<20}"
        for c in cs:
            s = res["by_concurrency"].get(c)
            line += (f"{s['tokens_per_s']:>13.2f}{s['latency_p50_s']:>8.2f}{s['ttft_p50_s']:>7.2f}" if s
                     else " " * 28)
        first = res["by_concurrency"].get(cs[0], {})
        pred = res.get("llama2_7b_prediction", {}).get("speedup")
        line += (f"{first.get('acceptance', float('nan')):>8.3f}{first.get('tokens_per_verification', float('nan')):>8.2f}"
                 f"{pred if pred is not None else float('nan'):>9.2f}")
        print(line)


if __name__ == "__main__":
    main()
