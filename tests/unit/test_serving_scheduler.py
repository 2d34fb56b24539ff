"""Dynamic batching over the engine on a worker thread: batching, grouping by exit config, cancellation."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from layerexit.engine.decode import EarlyExitEngine
from layerexit.engine.options import ExitConfig, SamplingParams
from layerexit.engine.reference import eos_ids
from layerexit.serving.scheduler import BatchScheduler, GenerationRequest

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]


@pytest.fixture(scope="module")
def engine(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    # no EOS: every request runs to max_new_tokens, so lengths are predictable
    return EarlyExitEngine(model, set(), tokenizer.pad_token_id)


@pytest.fixture()
def scheduler(engine):
    sched = BatchScheduler(engine, max_batch_size=8, batch_wait_timeout_s=0.5, max_concurrent_batches=2).start()
    yield sched
    sched.stop()


async def collect(sched: BatchScheduler, req: GenerationRequest) -> list[int]:
    out = []
    async with contextlib.aclosing(sched.events(req, timeout_s=60)) as stream:
        async for batch in stream:
            out.extend(ev.token_id for ev in batch.events)
    return out


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0)


def test_concurrent_requests_share_a_batch_and_match_the_engine(engine, scheduler) -> None:
    config = ExitConfig(policy="final")

    async def main():
        reqs = [GenerationRequest(p, config, greedy(6)) for p in PROMPTS]
        return await asyncio.gather(*(collect(scheduler, r) for r in reqs))

    outs = asyncio.run(main())
    expected = [r.token_ids for r in engine.generate(PROMPTS, config, greedy(6))]
    assert outs == expected
    assert scheduler.max_batch_seen == len(PROMPTS) and scheduler.batches == 1


def test_different_exit_configs_go_to_different_batches(scheduler) -> None:
    async def main():
        a = [GenerationRequest(p, ExitConfig(policy="final"), greedy(3)) for p in PROMPTS[:2]]
        b = [GenerationRequest(p, ExitConfig(policy="fixed", layer=1), greedy(3)) for p in PROMPTS[2:]]
        return await asyncio.gather(*(collect(scheduler, r) for r in a + b))

    outs = asyncio.run(main())
    assert all(len(o) == 3 for o in outs)
    assert sorted(scheduler.recent_batch_sizes) == [2, 2]


def test_interleaved_batches_of_different_lengths(engine, scheduler) -> None:
    """Two batches decoded in turn; the short one ends (leaving its inference mode) while the long one runs."""
    fixed = ExitConfig(policy="fixed", layer=2)

    async def main():
        short = GenerationRequest(PROMPTS[0], ExitConfig(policy="final"), greedy(2))
        long = GenerationRequest(PROMPTS[1], fixed, greedy(12))
        return await asyncio.gather(collect(scheduler, short), collect(scheduler, long))

    short, long = asyncio.run(main())
    assert len(short) == 2 and long == engine.generate([PROMPTS[1]], fixed, greedy(12))[0].token_ids


def test_a_cancelled_request_stops_and_its_batch_mates_finish(scheduler) -> None:
    config = ExitConfig(policy="final", kv="none")

    async def leaves_early(req: GenerationRequest) -> int:
        seen = 0
        async with contextlib.aclosing(scheduler.events(req, timeout_s=60)) as stream:
            async for batch in stream:
                seen += len(batch.events)
                if seen >= 3:
                    break  # the client went away
        return seen

    async def main():
        long = GenerationRequest(PROMPTS[0], config, greedy(80))
        short = GenerationRequest(PROMPTS[1], config, greedy(80))
        seen, rest = await asyncio.gather(leaves_early(long), collect(scheduler, short))
        return long, seen, rest

    long, seen, rest = asyncio.run(main())
    assert 3 <= seen < 80 and long.cancelled.is_set() and not long.finished  # late clients get coalesced chunks
    assert len(rest) == 80
    assert scheduler.max_batch_seen == 2 and scheduler.cancelled_rows == 1


def test_all_rows_cancelled_closes_the_batch(scheduler) -> None:
    config = ExitConfig(policy="final", kv="none")

    async def main():
        req = GenerationRequest(PROMPTS[0], config, greedy(450))
        async with contextlib.aclosing(scheduler.events(req, timeout_s=60)) as stream:
            async for _ in stream:
                break
        for _ in range(200):
            if scheduler.snapshot()["running_batches"] == 0:
                break
            await asyncio.sleep(0.01)
        return scheduler.snapshot()

    snap = asyncio.run(main())
    assert snap["running_batches"] == 0 and snap["steps"] < 100


def test_timeout_cancels(scheduler) -> None:
    async def main():
        req = GenerationRequest(PROMPTS[0], ExitConfig(policy="final", kv="none"), greedy(450))
        with pytest.raises(TimeoutError):
            await collect_with_timeout(scheduler, req, 0.05)
        return req

    async def collect_with_timeout(sched, req, timeout):
        async with contextlib.aclosing(sched.events(req, timeout_s=timeout)) as stream:
            async for _ in stream:
                pass

    req = asyncio.run(main())
    assert req.cancelled.is_set()
    scheduler.check()


def test_engine_errors_reach_the_request(scheduler) -> None:
    async def main():
        req = GenerationRequest([], ExitConfig(policy="final"), greedy(3))  # empty prompt: engine ConfigError
        return await collect(scheduler, req)

    from layerexit.errors import ConfigError

    with pytest.raises(ConfigError):
        asyncio.run(main())
    scheduler.check()  # the worker survived


def test_eos_ids_helper_is_what_the_server_uses(tiny_model_and_tokenizer) -> None:
    model, tokenizer = tiny_model_and_tokenizer
    assert tokenizer.eos_token_id in eos_ids(model, tokenizer)


async def _late_request(sched: BatchScheduler, first: GenerationRequest, late: GenerationRequest, after: int):
    """Run ``first``; once it has produced ``after`` tokens, submit ``late``. Returns both token lists and the
    engine batch sizes ``first`` saw."""
    first_out, sizes = [], []
    late_task = None
    async with contextlib.aclosing(sched.events(first, timeout_s=60)) as stream:
        async for batch in stream:
            first_out.extend(ev.token_id for ev in batch.events)
            sizes.append(batch.batch_size)
            if late_task is None and len(first_out) >= after:
                late_task = asyncio.create_task(collect(sched, late))
    return first_out, await late_task, sizes


@pytest.mark.parametrize("kv", ["recompute", "propagate"])
def test_a_late_request_joins_the_running_batch(engine, scheduler, kv) -> None:
    config = ExitConfig(policy="final", kv=kv)
    first = GenerationRequest(PROMPTS[2], config, greedy(200))  # long enough to be running when the late one comes
    late = GenerationRequest(PROMPTS[0], config, greedy(8))
    first_out, late_out, sizes = asyncio.run(_late_request(scheduler, first, late, after=3))
    assert first_out == engine.generate([PROMPTS[2]], config, greedy(200))[0].token_ids
    assert late_out == engine.generate([PROMPTS[0]], config, greedy(8))[0].token_ids
    assert scheduler.batches == 1 and scheduler.joined_rows == 1
    assert 2 in sizes and sizes[-1] == 1  # the engine batch grew when it joined and shrank when it finished


def test_without_continuous_batching_a_late_request_starts_its_own_batch(engine) -> None:
    sched = BatchScheduler(engine, max_batch_size=8, batch_wait_timeout_s=0.01, max_concurrent_batches=2,
                           continuous=False).start()
    try:
        config = ExitConfig(policy="final", kv="propagate")
        first = GenerationRequest(PROMPTS[2], config, greedy(200))
        late = GenerationRequest(PROMPTS[0], config, greedy(8))
        asyncio.run(_late_request(sched, first, late, after=3))
        assert sched.batches == 2 and sched.joined_rows == 0
    finally:
        sched.stop()


def test_a_cancelled_row_leaves_the_engine_batch(scheduler) -> None:
    config = ExitConfig(policy="final", kv="propagate")

    async def main():
        leaving = GenerationRequest(PROMPTS[0], config, greedy(200))
        staying = GenerationRequest(PROMPTS[1], config, greedy(150))
        sizes = []

        async def stay():
            async with contextlib.aclosing(scheduler.events(staying, timeout_s=60)) as stream:
                async for batch in stream:
                    sizes.append(batch.batch_size)

        async def leave():
            async with contextlib.aclosing(scheduler.events(leaving, timeout_s=60)) as stream:
                async for _ in stream:
                    break

        await asyncio.gather(stay(), leave())
        return sizes

    sizes = asyncio.run(main())
    assert sizes[0] == 2 and sizes[-1] == 1 and len(sizes) <= 150


def test_a_prompt_too_long_to_join_starts_its_own_batch(engine) -> None:
    """A running batch can only take prompts up to its current position; a longer one must not wait for it."""
    scheduler = BatchScheduler(engine, max_batch_size=8, batch_wait_timeout_s=0.01, max_concurrent_batches=2).start()
    config = ExitConfig(policy="final", kv="propagate")
    first = GenerationRequest(PROMPTS[1], config, greedy(150))  # positions never reach 200
    long_prompt = [5 + i % 400 for i in range(200)]
    late = GenerationRequest(long_prompt, config, greedy(5))

    async def main():
        task = asyncio.create_task(collect(scheduler, first))
        while scheduler.steps < 3:
            await asyncio.sleep(0.001)
        late_out = await collect(scheduler, late)
        first_still_running = not task.done()
        await task
        return late_out, first_still_running

    try:
        late_out, first_still_running = asyncio.run(main())
    finally:
        scheduler.stop()
    assert late_out == engine.generate([long_prompt], config, greedy(5))[0].token_ids
    assert scheduler.batches == 2 and scheduler.joined_rows == 0
    assert first_still_running, "the long prompt waited for the running batch instead of starting its own"
