"""Adaptive batching without a waiting window, behind a bounded queue with deadlines.

A request that finds the model idle runs at once, alone: nobody waits for a window to fill. While
a batch runs, new requests queue; when it finishes, everything queued that fits together runs as
the next batch, so the batch size follows the load by itself. The worker thread takes the next
batch itself, without a round trip through the event loop: under a flood the loop is busy
refusing requests, and a model that waited for it between batches lost a third of its
throughput (measured here, ``benchmarks/bench_serving_overload.py``). Requests are stacked only when
they agree on every input's non-batch shape (the sequence axis aside: it is padded per batch);
their row counts were checked to be uniform within each request before they got here.

The queue is bounded (``max_queue``: a full queue refuses at once) and every request carries a
deadline, counted from when the client began to send it. A request is refused at once when the
work ahead of it (the rest of the batch running, the rows queued ahead at the measured cost per
row) and its own run would end past its deadline; one still waiting when its deadline passes is
refused at the next batch boundary; and a batch takes only as many rows as can end by the
earliest deadline among them (``run_cost``), so no answer comes later than its deadline plus
one batch, even for a model whose cost grows with its rows. A batch that fails is run again one
request at a time, so only the request at fault fails, with its own error.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    import asyncio

from modelpack.errors import OverloadError
from modelpack.metrics import NoMetrics
from modelpack.serving.padding import (
    SequenceAxis,
    cut_outputs,
    pad_feeds,
    request_length,
    split_by_length,
)
from modelpack.serving.reservation import Reservation
from modelpack.serving.run_cost import RunCost
from modelpack.serving.stacking import shape_key, split_rows

RunBatch = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
Result = dict[str, np.ndarray] | Exception


class QueueMetrics(Protocol):
    def queue_depth(self, depth: int) -> None: ...
    def queue_wait(self, seconds: float) -> None: ...
    def queue_waits(self, seconds: Sequence[float]) -> None: ...
    def batch(self, rows: int) -> None: ...


@dataclass
class _Pending:
    feed: dict[str, np.ndarray]
    rows: int
    key: tuple[Any, ...]
    deadline: float  # time.monotonic() past which it may not start
    arrived: float
    future: asyncio.Future[dict[str, np.ndarray]] = field(repr=False)
    started: float = 0.0  # when its batch was taken


class Batcher:
    """Runs ``run`` on stacked requests, one batch at a time, in a worker thread (on the event
    loop itself when a batch takes less time than the hop to the thread)."""

    def __init__(
        self,
        run: RunBatch,
        plan: SequenceAxis | None = None,
        max_rows: int = 64,
        max_queue: int = 256,
        retry_after_s: int = 1,
        max_wait_s: float = float("inf"),
        metrics: QueueMetrics | None = None,
        executor: concurrent.futures.Executor | None = None,
        inline_below_s: float = 0.0005,
        run_cost_tokens: int = 32,
        run_alone: RunBatch | None = None,
    ) -> None:
        self.run = run
        # A request run on its own (alone, or again after its batch failed): where a failure
        # is classified as the client's or the model's.
        self.run_alone = run_alone or run
        self.plan = plan
        self.max_rows = max_rows
        self.max_queue = max_queue
        self.max_wait_s = max_wait_s
        self.retry_after_s = retry_after_s
        self.metrics: QueueMetrics = metrics or NoMetrics()
        self.executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="edgebento-batch"
        )
        # A batch that ran faster than a hop to the worker thread costs (tiny models) runs on
        # the event loop itself; anything slower runs in the thread so the loop keeps serving.
        self.inline_below_s = inline_below_s
        self.run_cost_tokens = run_cost_tokens
        self.last_run_s = float("inf")  # unknown until the first run (which uses the thread)
        # Wall-clock seconds per row between batch starts while a queue stands (run time plus
        # whatever else the process does meanwhile): what the queue ahead of a request costs.
        self.per_row_s = 0.0
        self.cost = RunCost()  # what one run of n rows takes the model
        self._busy_until = 0.0  # when the batch running now should end (time.monotonic())
        self._last_take: tuple[float, int] | None = None  # (when, rows) of a take that left a queue
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self.reserved = 0  # places held by Reservations (the event loop's thread only)
        # The queue is appended to on the event loop and taken from in the worker thread.
        self._lock = threading.Lock()
        self._earliest_deadline = float("inf")  # no queued request's deadline is before it
        self._draining = False
        self._depth_told = 0  # the queue depth the gauge shows
        self._drain_loop: asyncio.AbstractEventLoop | None = None  # the loop draining now
        self._worker: asyncio.Future[None] | None = None  # the thread's drain, while it runs
        self.batches = 0
        self.rows = 0

    @property
    def depth(self) -> int:
        return len(self._queue)

    def full(self) -> bool:
        """No room: ``max_queue`` requests wait or hold a place, or more work than
        ``max_wait_s`` does."""
        return (
            len(self._queue) + self.reserved >= self.max_queue
            or self.expected_wait() > self.max_wait_s
        )

    def expected_wait(self) -> float:
        """The queue's work, a held place counted as one row (its rows are in its body)."""
        return (self._queued_rows + self.reserved) * self.per_row_s

    def reserve(self) -> Reservation:
        """Hold a place for a request admitted from its headers, until ``release``."""
        return Reservation(self)

    def would_miss(self, deadline: float, rows: int = 1) -> bool:
        """True when the work ahead (the rest of the running batch, the rows queued) and the
        request's own run would end past ``deadline``: it is refused at once rather than
        parsed, queued and refused later (work wasted under load). A model with nothing to
        do takes any request: it answers as soon as it can."""
        now = time.monotonic()
        ahead = self.expected_wait() + max(0.0, self._busy_until - now)
        if not self._queue and not self.reserved and ahead <= 0:
            return False
        return now + ahead + self.cost.estimate(rows) > deadline

    def refuse_late(self) -> OverloadError:
        return OverloadError(
            self.late_message(), reason="deadline", retry_after_s=self.retry_after_s
        )

    def late_message(self) -> str:
        """``refuse_late``'s message: the work ahead now, to the millisecond."""
        ahead = self.expected_wait() + max(0.0, self._busy_until - time.monotonic())
        return (
            f"the work ahead would take {ahead:.3f} s, and the request would end past its "
            "deadline; retry shortly"
        )

    async def submit(
        self, feed: dict[str, np.ndarray], rows: int = 1, deadline: float | None = None
    ) -> dict[str, np.ndarray]:
        """Queue one validated request of ``rows`` rows; returns its own outputs, or raises
        OverloadError when the queue is full or its deadline passes before it starts."""
        if self.full():
            raise OverloadError(
                f"the model's queue is full ({len(self._queue)} requests, "
                f"{self.expected_wait():.2f} s of work, waiting); retry shortly",
                reason="queue_full",
                retry_after_s=self.retry_after_s,
            )
        if deadline is not None and self.would_miss(deadline, rows):
            raise self.refuse_late()
        import asyncio  # here, not at import: threaded targets (the agent) never load it

        loop = asyncio.get_running_loop()
        now = time.monotonic()
        pending = _Pending(
            feed,
            rows,
            shape_key(feed, self.plan),
            deadline if deadline is not None else float("inf"),
            now,
            loop.create_future(),
        )
        with self._lock:
            self._queue.append(pending)
            self._queued_rows += rows
            self._earliest_deadline = min(self._earliest_deadline, pending.deadline)
            # A drain left on a loop that has since closed (a test's asyncio.run) never ends.
            start = not self._draining or self._drain_loop is not loop
            self._draining, self._drain_loop = True, loop
        if start:
            # A callback, not a task: it runs after the requests read in this turn of the loop
            # have queued too (so they batch), without a task's and coroutine's cost.
            loop.call_soon(self._drain, loop)
        elif len(self._queue) >= 2 * self._depth_told:
            # It waits behind a running batch. The gauge is written as the queue doubles, and
            # exactly at each batch's end: a write per request cost 2% of the worker's CPU.
            self._tell_depth()
        return await pending.future

    def _tell_depth(self) -> None:
        self._depth_told = len(self._queue)
        self.metrics.queue_depth(self._depth_told)

    def _learn_drain_rate(self, now: float, rows: int) -> None:
        if self._last_take is not None:
            when, taken = self._last_take
            sample = (now - when) / max(1, taken)
            self.per_row_s = sample if not self.per_row_s else 0.8 * self.per_row_s + 0.2 * sample
        self._last_take = (now, rows) if self._queue and rows else None

    def _take(
        self, loop: asyncio.AbstractEventLoop | None = None
    ) -> tuple[list[_Pending], list[tuple[_Pending, float]]] | None:
        """The next batch, and the requests whose deadline passed (with how long they waited);
        None, and the drain over, when nothing waits. The queue is scanned only as far as the
        batch needs unless a deadline may have passed: under a flood it holds hundreds of
        requests, and the model's thread scans it holding the GIL. None too for a drain on
        ``loop`` once a drain on another loop owns the queue (its answers would go nowhere)."""
        with self._lock:
            if loop is not None and loop is not self._drain_loop:
                return None
            if not self._queue:
                self._draining = False
                return None
            now = time.monotonic()
            scan_all = now > self._earliest_deadline
            batch: list[_Pending] = []
            expired: list[tuple[_Pending, float]] = []
            kept: list[_Pending] = []
            rows = 0
            ends_by = float("inf")  # the batch must end by then: its members' deadlines
            closed = False  # a member would have made it end too late: the batch is complete
            while self._queue and (scan_all or (rows < self.max_rows and not closed)):
                item = self._queue.popleft()
                if item.future.done():
                    self._queued_rows -= item.rows
                    continue  # the client went away
                if now > item.deadline:
                    self._queued_rows -= item.rows
                    expired.append((item, now - item.arrived))
                    continue
                fits = not batch or (item.key == batch[0].key and rows + item.rows <= self.max_rows)
                if fits and batch and not closed:
                    # The batch shrinks to what its deadlines allow (a model whose cost grows
                    # with its rows would otherwise end a full batch past them).
                    end = now + self.cost.estimate(rows + item.rows)
                    closed = end > min(ends_by, item.deadline)
                if fits and not closed and rows < self.max_rows:
                    # A head that cannot end by its deadline still starts (it ends within one
                    # run of it) but does not shrink the batch: it is late whatever the size.
                    if batch or now + self.cost.estimate(item.rows) <= item.deadline:
                        ends_by = min(ends_by, item.deadline)
                    batch.append(item)
                    rows += item.rows
                    self._queued_rows -= item.rows
                else:
                    kept.append(item)
            self._queue.extendleft(reversed(kept))
            if batch:
                self._busy_until = now + self.cost.estimate(rows)
            if scan_all:
                self._earliest_deadline = min((i.deadline for i in kept), default=float("inf"))
            self._learn_drain_rate(now, rows)
        for item in batch:
            item.started = now
        return batch, expired

    def _settle(
        self,
        batch: list[_Pending],
        results: Sequence[Result],
        expired: list[tuple[_Pending, float]],
        runs: Sequence[int],
    ) -> None:
        """On the event loop (futures are not thread-safe): answer a batch and the expired,
        and count them here too, so the model's thread never waits on a metrics lock the loop
        holds (each wait costs it a turn at the GIL)."""
        self._tell_depth()
        self.metrics.queue_waits([item.started - item.arrived for item in batch])
        for rows in runs:
            self.metrics.batch(rows)
        for item, waited in expired:
            if not item.future.done():
                item.future.set_exception(
                    OverloadError(
                        f"the request waited {waited:.3f} s, past its deadline; retry shortly",
                        reason="deadline",
                        retry_after_s=self.retry_after_s,
                    )
                )
        for item, result in zip(batch, results, strict=True):
            if item.future.done():
                continue
            if isinstance(result, Exception):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)

    def _run_safely(self, batch: list[_Pending]) -> tuple[list[Result], list[int]]:
        """The batch's results, and the rows of each ORT run it took."""
        runs: list[int] = []
        try:
            return (self._run_batch(batch, runs) if batch else []), runs
        except Exception as exc:  # a bug of ours: answer everyone, keep draining
            return [exc] * len(batch), runs

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """The next batch: on the loop itself, between reads, while the model is faster than
        the hop to its thread; then in the thread, batch after batch until the queue is empty."""
        try:
            if self.last_run_s >= self.inline_below_s:
                self._worker = loop.run_in_executor(self.executor, self._drain_in_worker, loop)
                self._worker.add_done_callback(self._worker_ended)
                return
            taken = self._take(loop)
            if taken is None:
                return
            batch, expired = taken
            results, runs = self._run_safely(batch)
            self._settle(batch, results, expired, runs)
            # The next batch after the loop's next turn: requests read meanwhile join it.
            loop.call_soon(self._drain, loop)
        except BaseException:
            with self._lock:
                self._draining = False  # the next submit starts a new drain
            raise

    def _worker_ended(self, worker: asyncio.Future[None]) -> None:
        if worker.cancelled() or worker.exception() is not None:
            with self._lock:
                self._draining = False  # the next submit starts a new drain

    def _drain_in_worker(self, loop: asyncio.AbstractEventLoop) -> None:
        """Batch after batch until the queue is empty, each answered through the loop."""
        while (taken := self._take(loop)) is not None:
            batch, expired = taken
            results, runs = self._run_safely(batch)
            try:
                loop.call_soon_threadsafe(self._settle, batch, results, expired, runs)
            except RuntimeError:  # the loop closed (shutdown): nobody is left to answer
                with self._lock:
                    self._draining = False
                return

    def _run_alone(self, feed: dict[str, np.ndarray]) -> Result:
        try:
            return self.run_alone(feed)
        except Exception as exc:
            return exc

    def _run_batch(self, batch: list[_Pending], runs: list[int]) -> list[Result]:
        start = time.perf_counter()
        try:
            return self._run_stacked(batch, runs)
        finally:
            self._ran(start, runs)

    def _ran(self, start: float, runs: list[int]) -> None:
        self.last_run_s = time.perf_counter() - start
        self._busy_until = 0.0
        if len(runs) == 1:  # one ORT run (not a batch run again member by member)
            self.cost.observe(runs[0], self.last_run_s)

    def _run_stacked(self, batch: list[_Pending], runs: list[int]) -> list[Result]:
        if len(batch) == 1 or self.plan is None:
            return self._run_group(batch, runs)
        # Sequences: sort the batch into runs of similar length so short requests are not
        # padded to the longest one in the queue.
        lengths = [request_length(item.feed, self.plan) for item in batch]
        results: list[Result] = [{} for _ in batch]
        for group in split_by_length(lengths, self.run_cost_tokens):
            answers = self._run_group([batch[i] for i in group], runs)
            for i, answer in zip(group, answers, strict=True):
                results[i] = answer
        return results

    def _count(self, rows: int, runs: list[int]) -> None:
        self.batches += 1
        self.rows += rows
        runs.append(rows)

    def _run_group(self, batch: list[_Pending], runs: list[int]) -> list[Result]:
        """One ORT run over stacked (and padded) requests; their own outputs back."""
        if len(batch) == 1:
            self._count(batch[0].rows, runs)
            return [self._run_alone(batch[0].feed)]
        feeds = [item.feed for item in batch]
        lengths: list[int] = []
        if self.plan is not None:
            feeds, lengths = pad_feeds(feeds, self.plan)
        self._count(sum(item.rows for item in batch), runs)
        try:
            merged = {name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]}
            parts = split_rows(self.run(merged), [item.rows for item in batch])
        except Exception:
            # One member the model refuses must not fail the others: run them one by one.
            return [self._run_alone(item.feed) for item in batch]
        if self.plan is not None:
            parts = [cut_outputs(p, n, self.plan) for p, n in zip(parts, lengths, strict=True)]
        return list(parts)
