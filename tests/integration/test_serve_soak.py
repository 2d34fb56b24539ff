"""Serving soak: serve_configs/smollm2.yaml (SmolLM2, `serve run`), 4 clients sending requests back to back for
3 minutes with `early_exit: {"policy": "final"}`, so requests keep joining running batches (continuous
batching). A server that never compacts its batches slows down and grows; this one must not:

- tokens/s of the last minute >= 0.8 x the first minute's,
- replica RSS grows < 1.5x from the end of the first minute to the end,
- no request fails.

    LAYEREXIT_SOAK_S=180 LAYEREXIT_SOAK_OUT=/tmp/soak.json .venv/bin/python -m pytest tests/integration/test_serve_soak.py -s

``LAYEREXIT_SOAK_OUT`` writes the per-minute figures (tokens/s, p95 latency, RSS) as JSON. Skips when the
SmolLM2 checkpoint is not on the machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from layerexit.localhost import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "serve_configs" / "smollm2.yaml"
APP = "layerexit-smollm2"
DURATION_S = float(os.environ.get("LAYEREXIT_SOAK_S", "180"))
CLIENTS = 4
MAX_TOKENS = 64


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    ray = pytest.importorskip("ray")
    from ray import serve

    tmp = tmp_path_factory.mktemp("soak")
    port = free_port()
    config = yaml.safe_load(CONFIG.read_text())
    config["http_options"]["port"] = port
    path = tmp / "smollm2.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cli = Path(sys.executable).with_name("serve")
        proc = subprocess.run([str(cli), "run", str(path), "--non-blocking", "--address",
                               ray.get_runtime_context().gcs_address], capture_output=True, text=True, timeout=300,
                              cwd=tmp)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        url = f"http://127.0.0.1:{port}"
        end = time.monotonic() + 300
        while time.monotonic() < end:
            status = serve.status().applications.get(APP)
            if status is not None and status.status == "DEPLOY_FAILED":
                raise RuntimeError(status.message)
            try:
                if status is not None and status.status == "RUNNING" and \
                        httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def test_soak_four_clients_three_minutes_stays_flat(server) -> None:
    from layerexit.data.prompts import builtin_prompts_path, read_prompts

    prompts = [p.prompt for p in read_prompts(builtin_prompts_path())]
    pid = httpx.get(server + "/v1/early_exit", timeout=10).json()["pid"]
    done: list[tuple[float, int, float]] = []  # (finished at, completion tokens, latency)
    failures: list[str] = []
    rss: list[tuple[float, int]] = []
    t0 = time.monotonic()
    deadline = t0 + DURATION_S

    async def client(k: int) -> None:
        async with httpx.AsyncClient(timeout=120) as http:
            i = k
            while time.monotonic() < deadline:
                body = {"model": "smollm2", "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
                        "max_tokens": MAX_TOKENS, "temperature": 0, "early_exit": {"policy": "final"}}
                start = time.monotonic()
                try:
                    r = await http.post(server + "/v1/chat/completions", json=body)
                    if r.status_code != 200:
                        failures.append(f"{r.status_code}: {r.text[:200]}")
                    else:
                        done.append((time.monotonic() - t0, r.json()["usage"]["completion_tokens"],
                                     time.monotonic() - start))
                except httpx.HTTPError as err:
                    failures.append(repr(err))
                i += CLIENTS

    async def sample_rss() -> None:
        while time.monotonic() < deadline:
            rss.append((time.monotonic() - t0, rss_bytes(pid)))
            await asyncio.sleep(5)

    async def main() -> None:
        await asyncio.gather(*(client(k) for k in range(CLIENTS)), sample_rss())

    asyncio.run(main())
    minute = min(60.0, DURATION_S / 3)
    first = [d for d in done if d[0] <= minute]
    last = [d for d in done if d[0] > DURATION_S - minute]
    first_tps = sum(d[1] for d in first) / minute
    last_tps = sum(d[1] for d in last) / minute
    rss_start = next(v for t, v in rss if t >= minute) if any(t >= minute for t, _ in rss) else rss[0][1]
    rss_end = rss[-1][1]
    result = {
        "duration_s": DURATION_S, "clients": CLIENTS, "max_tokens": MAX_TOKENS, "requests": len(done),
        "failures": len(failures), "first_minute_tokens_per_s": round(first_tps, 2),
        "last_minute_tokens_per_s": round(last_tps, 2), "ratio": round(last_tps / first_tps, 3) if first_tps else None,
        "first_minute_p95_latency_s": round(pct([d[2] for d in first], 0.95), 3),
        "last_minute_p95_latency_s": round(pct([d[2] for d in last], 0.95), 3),
        "rss_start_mb": round(rss[0][1] / 2**20), "rss_after_first_minute_mb": round(rss_start / 2**20),
        "rss_end_mb": round(rss_end / 2**20),
        "scheduler": httpx.get(server + "/v1/early_exit", timeout=10).json()["scheduler"],
    }
    print(json.dumps(result, indent=2))
    if os.environ.get("LAYEREXIT_SOAK_OUT"):
        Path(os.environ["LAYEREXIT_SOAK_OUT"]).write_text(json.dumps(result, indent=2))
    assert not failures, failures[:5]
    assert first and last
    assert last_tps >= 0.8 * first_tps, result
    assert rss_end < 1.5 * rss_start, result
