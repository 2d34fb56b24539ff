"""Serving under pressure, over real HTTP on the tiny model: a KV budget smaller than the load queues requests
instead of failing them, and a replica killed while four streams run is restarted by Serve; the streams end
(with an error, never a hang) and new requests succeed within 60 s.

One Ray cluster and one application for the module; the kill test runs last.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest

from layerexit.localhost import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "tiny"
PROMPT_TOKENS_MAX = 48
MAX_TOKENS = 40
BUDGET = 2 * (PROMPT_TOKENS_MAX + MAX_TOKENS) + 8  # two long rows at a time


def wait_for(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            last = predicate()
            if last:
                return last
        except Exception as err:  # noqa: BLE001 - keep polling
            last = err
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    ray = pytest.importorskip("ray")
    from ray import serve

    from layerexit.models.tiny import save_tiny_checkpoint
    from layerexit.serving.app import build_app

    tmp = tmp_path_factory.mktemp("resilience")
    model_dir = save_tiny_checkpoint(tmp / "tiny-model", num_layers=4)
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = {"model": str(model_dir), "model_name": MODEL, "torch_threads": 1,
                "max_prompt_tokens": PROMPT_TOKENS_MAX, "max_tokens_limit": 460, "default_max_tokens": 8,
                "request_timeout_s": 120, "user_config": {"policy": "final"},
                "deployment_options": {"ray_actor_options": {"num_cpus": 1}, "health_check_period_s": 2,
                                       "health_check_timeout_s": 10}}
        # two applications, one replica each: one with a small KV budget, one without (for long streams)
        serve.run(build_app({**args, "kv_budget_tokens": BUDGET}), name="budget", route_prefix="/budget")
        serve.run(build_app(args), name="plain", route_prefix="/plain")
        url = f"http://127.0.0.1:{port}"
        for prefix in ("/budget", "/plain"):
            wait_for(lambda: httpx.get(url + prefix + "/health", timeout=5).status_code == 200, 180, prefix)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def completion(i: int, max_tokens: int) -> dict:
    return {"model": MODEL, "prompt": f"Story {i}", "max_tokens": max_tokens, "temperature": 0}


def test_more_requests_than_the_kv_budget_admits_queue_and_all_complete(base_url) -> None:
    base_url += "/budget"
    status = httpx.get(base_url + "/v1/early_exit", timeout=10).json()
    assert status["limits"]["kv_budget_tokens"] == BUDGET
    waits_before = status["scheduler"]["kv_waits"]

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(client.post(base_url + "/v1/completions", json=completion(i, MAX_TOKENS))
                                          for i in range(8)))

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * 8, [r.text for r in responses if r.status_code != 200]
    assert all(r.json()["usage"]["completion_tokens"] >= 1 for r in responses)
    after = httpx.get(base_url + "/v1/early_exit", timeout=10).json()["scheduler"]
    assert after["kv_waits"] > waits_before  # some requests waited for KV room instead of failing
    assert after["kv_reserved_tokens"] == 0
    # one request that could never fit the budget is a 400 naming max_tokens, not a queue that never moves
    too_big = httpx.post(base_url + "/v1/completions", json=completion(0, BUDGET), timeout=30)
    assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "max_tokens"


def test_replica_killed_under_load_restarts_and_streams_end_cleanly(base_url) -> None:
    base_url += "/plain"
    pid = httpx.get(base_url + "/v1/early_exit", timeout=10).json()["pid"]
    outcomes: list[str] = []

    async def stream(i: int, started: asyncio.Event) -> str:
        # kv none recomputes the prefix every step: ~20 s for 440 tokens on the tiny model, so the streams are
        # surely mid-way when the replica dies
        body = {**completion(i, 440), "stream": True, "early_exit": {"policy": "final", "kv": "none"}}
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(60, read=45)) as client:
                async with client.stream("POST", base_url + "/v1/completions", json=body) as resp:
                    if resp.status_code != 200:
                        return f"status {resp.status_code}"
                    async for line in resp.aiter_lines():
                        if line.startswith("data: ") and '"choices"' in line:
                            started.set()
                        if line.startswith("data: ") and '"error"' in line:
                            return "error event"
                        if line == "data: [DONE]":
                            return "done"
            return "closed"
        except httpx.TimeoutException:
            return "hang"
        except httpx.HTTPError as err:
            return f"connection error {type(err).__name__}"

    async def main():
        events = [asyncio.Event() for _ in range(4)]
        tasks = [asyncio.ensure_future(stream(i, e)) for i, e in enumerate(events)]
        waiters = [asyncio.ensure_future(e.wait()) for e in events]
        await asyncio.wait([*waiters, *tasks], timeout=60, return_when=asyncio.FIRST_COMPLETED)
        end = time.monotonic() + 60
        while not all(e.is_set() for e in events) and time.monotonic() < end:
            assert not any(t.done() for t in tasks), [t.result() for t in tasks if t.done()]
            await asyncio.sleep(0.05)
        assert all(e.is_set() for e in events), "the four streams did not all start"  # all four are streaming
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 90)
        return results, time.monotonic() - t0

    results, ended_after = asyncio.run(main())
    print(f"in-flight streams after the kill: {results} ({ended_after:.1f} s)")
    outcomes.extend(results)
    assert "hang" not in outcomes and "done" not in outcomes, outcomes  # none finished normally, none hung
    assert ended_after < 60, ended_after

    killed_at = time.monotonic()

    def served_by_a_new_replica():
        r = httpx.post(base_url + "/v1/completions", json=completion(9, 4), timeout=20)
        return r.status_code == 200 and httpx.get(base_url + "/v1/early_exit", timeout=10).json()["pid"] != pid

    wait_for(served_by_a_new_replica, 60, "a new replica answering")
    assert time.monotonic() - killed_at < 60
