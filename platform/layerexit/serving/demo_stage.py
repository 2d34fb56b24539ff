"""`make demo`'s serving stage: serve the model locally, ask it one chat question through the `openai` client,
print the answer and what early exit did, shut Serve down.

Called as ``run_demo_serving(console, "smollm2", {"policy": "confidence", "thresholds": "paper-7b"})``.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

APP_NAME = "layerexit-demo"
DEMO_QUESTION = "Give three tips for staying healthy."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stats_table(rows: list[tuple[str, dict[str, Any], float, int]]) -> Table:
    table = Table(title="early exit, per response")
    for col in ("policy", "tokens", "mean exit layer", "exit layers (layer: tokens)", "decode FLOPs vs full depth",
                "seconds"):
        table.add_column(col, justify="left" if col.startswith(("policy", "exit")) else "right")
    for label, st, seconds, tokens in rows:
        hist = ", ".join(f"{k}: {v}" for k, v in st.get("exit_layer_histogram", {}).items())
        ratio = st["flops"] / st["flops_full"] if st.get("flops_full") else float("nan")
        table.add_row(label, str(tokens), f"{st.get('mean_exit_layer') or 0:.2f} / {st['num_layers']}", hist,
                      f"{ratio:.2f}x ({st.get('flops_saved_fraction', 0):+.0%} saved)", f"{seconds:.1f}")
    return table


def run_demo_serving(console: Console, model_spec: str, user_config: dict[str, Any] | None,
                     question: str = DEMO_QUESTION, max_tokens: int = 64) -> dict[str, Any]:
    """Start Serve for ``model_spec`` with ``user_config`` as the default exit policy, send one chat request
    (and the same request at full depth, for comparison), print the answers and statistics, shut down."""
    import ray
    from openai import OpenAI
    from ray import serve

    from layerexit.serving.app import build_app

    t0 = time.time()
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    cpus = max(1, min(int(ray.available_resources().get("CPU", 1)), os.cpu_count() or 1))
    port = _free_port()
    result: dict[str, Any] = {"model": model_spec, "user_config": user_config}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app({
            "model": model_spec, "model_name": "demo", "user_config": user_config or None, "torch_threads": cpus,
            "max_batch_size": 4, "default_max_tokens": max_tokens, "request_timeout_s": 300,
            "deployment_options": {"ray_actor_options": {"num_cpus": cpus}},
        })
        console.rule(f"Serving {model_spec} with Ray Serve (OpenAI API on http://127.0.0.1:{port}/v1)")
        serve.run(app, name=APP_NAME, route_prefix="/")
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="demo", max_retries=0, timeout=300)
        messages = [{"role": "user", "content": question}]
        rows = []
        for label, extra in (("default (user_config)", {}), ("final (full depth)", {"early_exit": {"policy": "final"}})):
            t1 = time.time()
            resp = client.chat.completions.create(model="demo", messages=messages, max_tokens=max_tokens,
                                                  temperature=0, extra_body=extra or None)
            seconds = time.time() - t1
            stats = resp.model_extra["early_exit"]
            answer = resp.choices[0].message.content
            console.print(Panel(escape(answer.strip() or "(empty)"),
                                title=escape(f"{question} ({label}: {stats['policy']})"), title_align="left"))
            rows.append((f"{label}: {stats['policy']}", stats, seconds, resp.usage.completion_tokens))
            key = "default" if not extra else "final"
            result[key] = {"answer": answer, "early_exit": stats, "seconds": round(seconds, 2),
                           "completion_tokens": resp.usage.completion_tokens}
        console.print(_stats_table(rows))
        result["url"] = f"http://127.0.0.1:{port}/v1"
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown()
    result["seconds"] = round(time.time() - t0, 1)
    console.print(f"serving stage finished in {result['seconds']:.0f} s (Serve shut down)")
    return result
