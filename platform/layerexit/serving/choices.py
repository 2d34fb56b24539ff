"""Choices of one request: each prompt x ``n`` is its own engine row, decoded through the scheduler, turned into
text (stop strings honoured) with its own exit statistics and, when asked, its log-probs.

No HTTP here: the deployment builds ``ChoicePlan``s, runs them with ``collect`` (non-streaming) or ``merge``
(streaming, deltas of every choice interleaved as they come) and maps errors to responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace

from layerexit.engine.options import ExitConfig, SamplingParams
from layerexit.serving.logprobs import TokenScores
from layerexit.serving.protocol import ExitStatsAccumulator, TextAssembler, exit_config_key
from layerexit.serving.scheduler import BatchScheduler, GenerationRequest, TokenBatch

LOGPROBS_FROM_EXIT = ("each generated token's exit layer (its early_exit histogram); policy self-speculative: "
                      "the final layer that verified it")
LOGPROBS_FROM_ECHO = "; echoed prompt tokens: a full-depth prefill"


@dataclass
class ChoicePlan:
    """One choice to generate: its index in the response, its prompt and its sampling settings."""

    index: int
    prompt_ids: list[int]
    prompt_text: str
    sampling: SamplingParams
    echo: TokenScores | None = None  # prompt tokens with full-depth log-probs (echo + logprobs)


@dataclass
class Outcome:
    """What one choice produced so far (final after its generator ends)."""

    index: int
    stats: ExitStatsAccumulator
    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None
    ttft: float | None = None
    scores: TokenScores = field(default_factory=TokenScores)  # generated tokens (when log-probs were asked)
    sent_tokens: int = 0  # generated tokens whose text has gone out


def plan_choices(prompts: Sequence[tuple[list[int], str]], n: int, sampling: SamplingParams) -> list[ChoicePlan]:
    """``len(prompts) x n`` choices, index = prompt * n + j (OpenAI's order). With a seed, choice j samples with
    ``seed + j`` so ``n`` seeded choices differ from each other and are each reproducible."""
    plans = []
    for p, (ids, text) in enumerate(prompts):
        for j in range(n):
            seed = None if sampling.seed is None else sampling.seed + j
            plans.append(ChoicePlan(p * n + j, list(ids), text, replace(sampling, seed=seed)))
    return plans


async def generate_choice(scheduler: BatchScheduler, tokenizer, plan: ChoicePlan, config: ExitConfig,
                          stats: ExitStatsAccumulator, stops: list[str], timeout_s: float | None,
                          started: float, on_first: Callable[[Outcome, TokenBatch], None] | None = None,
                          on_token: Callable[[int], None] | None = None) -> AsyncIterator[tuple[str, list[int], Outcome]]:
    """Yield (text delta, exit layers of its tokens, outcome so far) for one choice; the outcome is final after
    the last item. Raises TimeoutError, SchedulerError or LayerexitError (the caller maps them)."""
    outcome = Outcome(plan.index, stats)
    want_logprobs = plan.sampling.logprobs is not None
    assembler = TextAssembler(tokenizer, stops)
    request = GenerationRequest(plan.prompt_ids, config, plan.sampling, key=exit_config_key(config))
    async with contextlib.aclosing(scheduler.events(request, timeout_s)) as stream:
        async for batch in stream:
            if outcome.ttft is None:
                outcome.ttft = time.perf_counter() - started
                stats.batch_size = batch.batch_size
                stats.prefill_flops = batch.prefill_flops
                if on_first is not None:
                    on_first(outcome, batch)
            text, layers, done = "", [], False
            for ev in batch.events:
                outcome.completion_tokens += 1
                stats.add(ev.exit_layer, ev.flops, ev.flops_full)
                if want_logprobs:
                    outcome.scores.add(ev.token_id, getattr(ev, "logprob", None), getattr(ev, "top_logprobs", None))
                if on_token is not None:
                    on_token(ev.exit_layer)
                delta, delta_layers = assembler.add(ev.token_id, ev.exit_layer)
                text, layers = text + delta, layers + delta_layers
                if assembler.stopped or ev.finished:
                    outcome.finish_reason = "stop" if assembler.stopped else ev.finish_reason
                    tail, tail_layers = assembler.finish()
                    text, layers, done = text + tail, layers + tail_layers, True
                    break
            outcome.text += text
            outcome.sent_tokens = assembler.sent_tokens
            if text or done:
                yield text, layers, outcome  # one chunk per engine read, however many tokens it holds
            if done:
                return
    if outcome.finish_reason is None:  # the batch ended without a last token for this choice
        tail, tail_layers = assembler.finish()
        outcome.text += tail
        outcome.sent_tokens = assembler.sent_tokens
        outcome.finish_reason = "length"
        yield tail, tail_layers, outcome


async def collect(gens: Sequence[AsyncIterator[tuple[str, list[int], Outcome]]]) -> list[Outcome]:
    """Run every choice to its end concurrently (they share engine batches); the first error cancels the rest."""

    async def drain(gen) -> Outcome:
        outcome = None
        async with contextlib.aclosing(gen) as items:
            async for _text, _layers, outcome in items:
                pass
        return outcome

    tasks = [asyncio.ensure_future(drain(g)) for g in gens]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def merge(gens: Sequence[AsyncIterator[tuple[str, list[int], Outcome]]]
                ) -> AsyncIterator[tuple[str, list[int], Outcome, bool]]:
    """Every choice's deltas as they come: (text, exit layers, outcome, False), then once per choice
    ("", [], final outcome, True). The first error is raised here and stops the other choices."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(gen) -> None:
        outcome = None
        try:
            async with contextlib.aclosing(gen) as items:
                async for item in items:
                    outcome = item[2]
                    queue.put_nowait((item, False))
            queue.put_nowait((("", [], outcome), True))  # the choice's end, with its final outcome
        except Exception as err:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait((err, True))

    tasks = [asyncio.ensure_future(pump(g)) for g in gens]
    try:
        remaining = len(tasks)
        while remaining:
            item, last = await queue.get()
            if isinstance(item, Exception):
                raise item
            if last:
                remaining -= 1
            text, layers, outcome = item
            if outcome is not None:
                yield text, layers, outcome, last
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
