"""Continuous batching over the engine's step iterator, on one worker thread per replica.

Requests wait in a pending list (at most ``batch_wait_timeout_s`` for company); the worker thread forms a batch
from the oldest request and every pending request with the same exit config (the engine takes one ExitConfig
per batch), up to ``max_batch_size``, and starts ``engine.stream`` on it. While a batch decodes, requests with
its exit config join it between steps (``continuous``, the default) as long as it has room: the engine prefills
them so their prompts end at the batch's current position, and rows whose client went away leave. Up to
``max_concurrent_batches`` batches run at once, stepped in turn, for requests with other exit configs, for
requests that do not fit a running batch (no room, a prompt longer than the batch's position so far) and for
batches that cannot take joins at the moment (``kv: recompute`` while a deep layer's cache lags behind).

Each step's tokens go to the requests' asyncio queues through ``loop.call_soon_threadsafe``. A request whose
client went away (or that hit a stop string or its timeout) sets its ``cancelled`` flag: its tokens are dropped,
and a batch whose rows are all cancelled or finished is closed at once, so abandoned work stops within a step.
The event loop never runs model code, so the replica stays responsive (health checks, new requests, metrics).

With a KV budget (``kv_budget_tokens``), a request starts or joins a batch only while the positions reserved by
all running batches (``kv_budget.batch_reservation``) stay within it; the others wait in the queue, in order.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from layerexit.engine.decode import EarlyExitEngine, SequenceResult, TokenEvent
from layerexit.engine.options import ExitConfig, SamplingParams
from layerexit.serving.kv_budget import batch_reservation, request_reservation

logger = logging.getLogger("ray.serve")


@dataclass
class GenerationRequest:
    """One request as the scheduler sees it: token ids in, token events out."""

    prompt_ids: list[int]
    exit_config: ExitConfig
    sampling: SamplingParams
    key: str = ""  # requests with equal keys may share a batch
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: bool = False  # the engine reported its last token
    queue: asyncio.Queue | None = None
    loop: asyncio.AbstractEventLoop | None = None

    def __post_init__(self) -> None:
        if not self.key:
            self.key = self.exit_config.model_dump_json(exclude_none=True)

    @property
    def kv_tokens(self) -> int:
        """KV positions this row may need (prompt + max_new_tokens)."""
        return request_reservation(len(self.prompt_ids), self.sampling.max_new_tokens)


@dataclass
class TokenBatch:
    """What a request's queue receives per engine step."""

    events: list[TokenEvent]
    batch_size: int
    prefill_flops: int


@dataclass
class _Batch:
    rows: list[GenerationRequest]  # in the engine's row index order; joined requests are appended
    gen: Any  # the engine's stream iterator
    results: list[SequenceResult]
    started: float = field(default_factory=time.monotonic)
    key: str = ""
    open: bool = False  # the engine offered to take joins at its last step
    room: int = 0  # how many more rows it could take then
    max_join_len: int = 0  # the longest prompt it could take then (its position; grows by one per step)


class _Joiner:
    """The engine's continuous-batching hooks for one running batch (called on the worker thread)."""

    def __init__(self, scheduler: "BatchScheduler", batch: _Batch) -> None:
        self.scheduler = scheduler
        self.batch = batch

    def admit(self, max_prompt_len: int, rows: int) -> list[tuple[list[int], SamplingParams]]:
        sched, batch = self.scheduler, self.batch
        batch.open = True
        batch.room = sched.max_batch_size - rows
        batch.max_join_len = max_prompt_len
        with sched._cond:
            fits = [r for r in sched._pending if r.key == batch.key and not r.cancelled.is_set()
                    and len(r.prompt_ids) <= max_prompt_len][: batch.room]
            fits = sched._within_budget(fits, batch, rows)
            if not fits:
                return []
            taken = {id(r) for r in fits}
            sched._pending = [r for r in sched._pending if id(r) not in taken]
            batch.rows.extend(fits)
        batch.room -= len(fits)
        sched.joined_rows += len(fits)
        sched.max_batch_seen = max(sched.max_batch_seen, rows + len(fits))
        return [(r.prompt_ids, r.sampling) for r in fits]

    def cancelled(self, index: int) -> bool:
        return self.batch.rows[index].cancelled.is_set()


class SchedulerError(RuntimeError):
    """The worker thread died or stopped making progress."""


class BatchScheduler:
    """Feeds batches of ``GenerationRequest`` to an ``EarlyExitEngine`` on a worker thread."""

    def __init__(self, engine: EarlyExitEngine, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.02,
                 max_concurrent_batches: int = 2, stall_timeout_s: float = 120.0,
                 on_step: Callable[[int], None] | None = None, continuous: bool = True,
                 kv_budget_tokens: int | None = None) -> None:
        self.engine = engine
        self.kv_budget_tokens = kv_budget_tokens
        self.continuous = continuous
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.max_concurrent_batches = max_concurrent_batches
        self.stall_timeout_s = stall_timeout_s
        self.on_step = on_step  # called with the engine batch's row count after every decode step
        self._cond = threading.Condition()
        self._pending: list[GenerationRequest] = []
        self._active: list[_Batch] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_progress = time.monotonic()
        # counters, read by the status endpoint and tests
        self.batches = 0
        self.steps = 0
        self.tokens = 0
        self.cancelled_rows = 0
        self.joined_rows = 0  # requests that joined a running batch
        self.max_batch_seen = 0
        self.kv_waits = 0  # times a request that had a place waited for KV budget
        self.recent_batch_sizes: deque[int] = deque(maxlen=64)

    # ------------------------------------------------------------------------------------ lifecycle
    def start(self) -> "BatchScheduler":
        if self._thread is None:
            self._thread = threading.Thread(target=self._worker, name="layerexit-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def check(self) -> None:
        """Raise SchedulerError when the worker is dead or stuck (used by ``check_health``)."""
        if self._error is not None:
            raise SchedulerError(f"engine worker failed: {self._error!r}")
        if self._thread is None or not self._thread.is_alive():
            raise SchedulerError("engine worker thread is not running")
        if self._active and time.monotonic() - self.last_progress > self.stall_timeout_s:
            raise SchedulerError(f"no engine step finished for {self.stall_timeout_s:.0f} s")

    def snapshot(self) -> dict[str, Any]:
        with self._cond:
            pending = len(self._pending)
            active = [len([r for r in b.rows if not (r.finished or r.cancelled.is_set())]) for b in self._active]
        return {
            "pending": pending,
            "running_batches": len(active),
            "running_requests": sum(active),
            "batches": self.batches,
            "steps": self.steps,
            "tokens": self.tokens,
            "cancelled_rows": self.cancelled_rows,
            "joined_rows": self.joined_rows,
            "max_batch_size_seen": self.max_batch_seen,
            "kv_budget_tokens": self.kv_budget_tokens,
            "kv_reserved_tokens": self._kv_reserved(),
            "kv_waits": self.kv_waits,
            "recent_batch_sizes": list(self.recent_batch_sizes),
        }

    # ------------------------------------------------------------------------------------ event-loop side
    def submit(self, request: GenerationRequest) -> asyncio.Queue:
        """Queue a request (call from the event loop); its token batches arrive on the returned queue."""
        request.loop = asyncio.get_running_loop()
        request.queue = asyncio.Queue()
        request.enqueued = time.monotonic()
        with self._cond:
            if self._stopping:
                raise SchedulerError("the scheduler is stopping")
            self._pending.append(request)
            self._cond.notify_all()
        return request.queue

    def cancel(self, request: GenerationRequest) -> None:
        """Stop generating for ``request`` (client gone, stop string, timeout). Safe to call more than once."""
        if not request.cancelled.is_set():
            request.cancelled.set()
            if not request.finished:
                self.cancelled_rows += 1
            with self._cond:
                self._cond.notify_all()

    async def events(self, request: GenerationRequest, timeout_s: float | None = None) -> AsyncIterator[TokenBatch]:
        """Submit ``request`` and yield its token batches until it finishes; cancels it when the consumer stops
        early (``aclose``, task cancellation). Raises ``TimeoutError`` after ``timeout_s`` and re-raises engine
        errors."""
        queue = self.submit(request)
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        try:
            while True:
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError
                item = await asyncio.wait_for(queue.get(), remaining)
                # A consumer that fell behind (slow client, busy proxy) gets everything queued in one piece:
                # one chunk per read instead of one per token keeps the per-token HTTP overhead bounded.
                while isinstance(item, TokenBatch) and not queue.empty():
                    nxt = queue.get_nowait()
                    if not isinstance(nxt, TokenBatch):
                        queue.put_nowait(nxt)  # an end/error marker: handled on the next read
                        break
                    item = TokenBatch(item.events + nxt.events, item.batch_size, item.prefill_flops)
                if isinstance(item, BaseException):
                    raise item
                if item is None:  # the batch ended without this row finishing
                    return
                yield item
                if any(ev.finished for ev in item.events):
                    return
        finally:
            self.cancel(request)

    # ------------------------------------------------------------------------------------ worker side
    @staticmethod
    def _post(request: GenerationRequest, item: Any) -> None:
        if request.loop is None or request.queue is None or request.loop.is_closed():
            return
        try:
            request.loop.call_soon_threadsafe(request.queue.put_nowait, item)
        except RuntimeError:  # loop closed in the meantime
            pass

    @staticmethod
    def _live_reservations(batch: _Batch) -> list[int]:
        return [r.kv_tokens for r in batch.rows if not (r.finished or r.cancelled.is_set())]

    def _kv_reserved(self, skip: _Batch | None = None) -> int:
        """KV positions the running batches hold (all but ``skip``)."""
        return sum(batch_reservation(self._live_reservations(b)) for b in list(self._active) if b is not skip)

    def _within_budget(self, rows: list[GenerationRequest], batch: _Batch | None = None,
                       engine_rows: int = 0) -> list[GenerationRequest]:
        """The longest prefix of ``rows`` that fits the KV budget, as a new batch or (``batch``) joined to one
        whose engine batch holds ``engine_rows`` rows."""
        if self.kv_budget_tokens is None or not rows:
            return rows
        others = self._kv_reserved(skip=batch)
        have = [] if batch is None else self._live_reservations(batch)
        held = max(engine_rows - len(have), 0)  # rows still in the engine batch (finished, not yet dropped)
        widest = max(have, default=0)
        taken: list[GenerationRequest] = []
        for r in rows:
            widest = max(widest, r.kv_tokens)
            if others + (len(have) + held + len(taken) + 1) * widest > self.kv_budget_tokens:
                self.kv_waits += 1
                break
            taken.append(r)
        return taken

    def _ready_batch(self, now: float) -> list[GenerationRequest] | None:
        """Under the lock: the next batch to start, or None when the oldest request should wait longer."""
        self._pending = [r for r in self._pending if not r.cancelled.is_set()]
        # Requests a running batch will take at its next step stay out of new batches; a prompt longer than
        # that batch's position so far could not join it yet, so it goes to a new batch rather than wait.
        joinable = {b.key: [b.room, b.max_join_len + 1] for b in self._active if b.open and b.room > 0}
        candidates = []
        for r in self._pending:
            slot = joinable.get(r.key)  # [places left, longest prompt it takes at its next step]
            if slot and slot[0] > 0 and len(r.prompt_ids) <= slot[1]:
                slot[0] -= 1
            else:
                candidates.append(r)
        if not candidates:
            return None
        oldest = candidates[0]
        same = [r for r in candidates if r.key == oldest.key][: self.max_batch_size]
        if len(same) < self.max_batch_size and now - oldest.enqueued < self.batch_wait_timeout_s:
            return None
        same = self._within_budget(same)  # the rest wait for running batches to free KV positions
        if not same:
            return None
        taken = {id(r) for r in same}
        self._pending = [r for r in self._pending if id(r) not in taken]
        return same

    def _start_batch(self, rows: list[GenerationRequest]) -> None:
        results = [SequenceResult() for _ in rows]
        batch = _Batch(list(rows), None, results, key=rows[0].key)
        batch.gen = self.engine.stream([r.prompt_ids for r in rows], rows[0].exit_config, [r.sampling for r in rows],
                                       results=results, joiner=_Joiner(self, batch) if self.continuous else None)
        self._active.append(batch)
        self.batches += 1
        self.max_batch_seen = max(self.max_batch_seen, len(rows))
        self.recent_batch_sizes.append(len(rows))

    def _finish_batch(self, batch: _Batch, error: BaseException | None = None) -> None:
        try:
            batch.gen.close()
        except Exception:  # noqa: BLE001
            logger.exception("closing an engine stream failed")
        with self._cond:
            if batch in self._active:
                self._active.remove(batch)
        for row in batch.rows:
            if not row.finished:
                self._post(row, error if error is not None else None)

    def _step(self, batch: _Batch) -> None:
        if all(r.finished or r.cancelled.is_set() for r in batch.rows):
            self._finish_batch(batch)
            return
        batch.open = False  # until the engine offers again during this step
        try:
            events = next(batch.gen)
        except StopIteration:
            self._finish_batch(batch)
            return
        except Exception as err:  # noqa: BLE001 - reported to each request, the worker keeps running
            logger.exception("engine batch failed")
            self._finish_batch(batch, err)
            return
        self.steps += 1
        self.tokens += len(events)
        self.last_progress = time.monotonic()
        by_row: dict[int, list[TokenEvent]] = {}
        for ev in events:
            by_row.setdefault(ev.index, []).append(ev)
        size = len(by_row)  # rows in the engine batch this step (a verified draft gives a row several events)
        if self.on_step is not None:
            try:
                self.on_step(size)
            except Exception:  # noqa: BLE001 - metrics must never break generation
                logger.exception("on_step callback failed")
        for index, evs in by_row.items():
            row = batch.rows[index]
            if row.cancelled.is_set() or row.finished:
                continue
            if any(ev.finished for ev in evs):
                row.finished = True
            self._post(row, TokenBatch(evs, size, batch.results[index].prefill_flops))

    def _worker(self) -> None:
        import torch

        # One inference mode around everything: the engine's streams each enter and leave inference mode
        # themselves, and interleaved generators would otherwise leave it switched off for each other.
        with torch.inference_mode():
            self._worker_loop()

    def _worker_loop(self) -> None:
        try:
            while True:
                with self._cond:
                    if self._stopping:
                        break
                    now = time.monotonic()
                    while len(self._active) < self.max_concurrent_batches:
                        rows = self._ready_batch(now)
                        if rows is None:
                            break
                        self._start_batch(rows)
                    if not self._active:
                        if self._pending:
                            wait = self.batch_wait_timeout_s - (now - self._pending[0].enqueued)
                            self._cond.wait(max(wait, 0.001))
                        else:
                            self._cond.wait(0.5)
                        continue
                    active = list(self._active)
                for batch in active:
                    self._step(batch)
        except BaseException as err:  # noqa: BLE001 - recorded for check_health
            self._error = err
            logger.exception("engine worker died")
        finally:
            with self._cond:
                batches, self._active = list(self._active), []
                pending, self._pending = list(self._pending), []
            for batch in batches:
                self._finish_batch(batch, SchedulerError("the engine worker stopped"))
            for row in pending:
                self._post(row, SchedulerError("the engine worker stopped"))
