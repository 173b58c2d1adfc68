"""Adaptive batching without a waiting window.

A request that finds the model idle runs at once, alone: nobody waits for a window to fill (a
lone client would otherwise pay the full window on every request). While a batch runs, new
requests queue; when it finishes, everything queued that fits together (same non-batch shape,
up to ``max_rows``) runs as the next batch. The batch size so follows the load by itself, and a
queue never waits longer than one model run. Sequence inputs are padded per batch only as far as
its longest member needs (``padding``), after sorting a queued batch into runs of similar
length.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from bentos.padding import SequenceAxis, cut_outputs, pad_feeds, request_length, split_by_length
from modelpack.errors import InferenceError, InputError

RunBatch = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass
class _Pending:
    feed: dict[str, np.ndarray]
    rows: int
    key: tuple[tuple[int, ...], ...]
    future: asyncio.Future[dict[str, np.ndarray]] = field(repr=False)


def shape_key(
    feed: Mapping[str, np.ndarray], plan: SequenceAxis | None
) -> tuple[tuple[int, ...], ...]:
    """Requests with equal keys can be stacked (the sequence axis may differ: it is padded)."""
    key = []
    for name in sorted(feed):
        dims = list(feed[name].shape[1:])
        if plan is not None and name in plan.inputs:
            dims[plan.inputs[name] - 1] = -1
        key.append(tuple(dims))
    return tuple(key)


def split_rows(
    outputs: Mapping[str, np.ndarray], rows: Sequence[int]
) -> list[dict[str, np.ndarray]]:
    total = sum(rows)
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != total:
            raise InferenceError(
                f"output {name!r} has shape {list(array.shape)}: not batch-major, cannot batch"
            )
    bounds = np.cumsum([0, *rows])
    return [
        {name: array[start:end] for name, array in outputs.items()}
        for start, end in itertools.pairwise(bounds)
    ]


class Batcher:
    """Runs ``run`` on stacked requests, one batch at a time, in a worker thread (on the event
    loop itself when a batch takes less time than the hop to the thread)."""

    def __init__(
        self,
        run: RunBatch,
        plan: SequenceAxis | None = None,
        max_rows: int = 64,
        executor: concurrent.futures.Executor | None = None,
        inline_below_s: float = 0.0005,
        run_cost_tokens: int = 32,
    ) -> None:
        self.run = run
        self.plan = plan
        self.max_rows = max_rows
        self.executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="edgebento-batch"
        )
        # A batch that ran faster than a hop to the worker thread costs (tiny models) runs on
        # the event loop itself; anything slower runs in the thread so the loop keeps serving.
        self.inline_below_s = inline_below_s
        self.run_cost_tokens = run_cost_tokens
        self.last_run_s = float("inf")  # unknown until the first run (which uses the thread)
        self._queue: deque[_Pending] = deque()
        self._draining = False
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.rows = 0

    async def submit(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Queue one validated request; returns its own outputs."""
        loop = asyncio.get_running_loop()
        rows = int(next(iter(feed.values())).shape[0]) if feed else 1
        pending = _Pending(feed, rows, shape_key(feed, self.plan), loop.create_future())
        self._queue.append(pending)
        if not self._draining:
            self._draining = True
            # Kept so the task is not garbage-collected while it runs.
            self._task = loop.create_task(self._drain())
        return await pending.future

    def _take_batch(self) -> list[_Pending]:
        first = self._queue.popleft()
        batch, rows, skipped = [first], first.rows, deque[_Pending]()
        while self._queue and rows < self.max_rows:
            item = self._queue.popleft()
            if item.key == first.key and rows + item.rows <= self.max_rows:
                batch.append(item)
                rows += item.rows
            else:
                skipped.append(item)
        self._queue.extendleft(reversed(skipped))
        return batch

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                batch = self._take_batch()
                try:
                    if self.last_run_s < self.inline_below_s:
                        results = self._run_batch(batch)
                        await asyncio.sleep(0)  # let the loop read requests between batches
                    else:
                        results = await loop.run_in_executor(self.executor, self._run_batch, batch)
                except Exception as exc:
                    for item in batch:
                        if not item.future.done():
                            item.future.set_exception(exc)
                    continue
                for item, result in zip(batch, results, strict=True):
                    if item.future.done():
                        continue
                    if isinstance(result, Exception):
                        item.future.set_exception(result)
                    else:
                        item.future.set_result(result)
        finally:
            self._draining = False

    def _run_alone(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray] | Exception:
        try:
            return self.run(feed)
        except InputError as exc:
            return exc

    def _run_batch(self, batch: list[_Pending]) -> list[dict[str, np.ndarray] | Exception]:
        start = time.perf_counter()
        try:
            return self._run_stacked(batch)
        finally:
            self.last_run_s = time.perf_counter() - start

    def _run_stacked(self, batch: list[_Pending]) -> list[dict[str, np.ndarray] | Exception]:
        if len(batch) == 1:
            self._count(batch)
            return [self.run(batch[0].feed)]
        if self.plan is None:
            return self._run_group(batch)
        # Sequences: sort the batch into runs of similar length so short requests are not
        # padded to the longest one in the queue.
        lengths = [request_length(item.feed, self.plan) for item in batch]
        results: list[dict[str, np.ndarray] | Exception] = [{} for _ in batch]
        for group in split_by_length(lengths, self.run_cost_tokens):
            answers = self._run_group([batch[i] for i in group])
            for i, answer in zip(group, answers, strict=True):
                results[i] = answer
        return results

    def _count(self, batch: list[_Pending]) -> None:
        self.batches += 1
        self.rows += sum(item.rows for item in batch)

    def _run_group(self, batch: list[_Pending]) -> list[dict[str, np.ndarray] | Exception]:
        """One ORT run over stacked (and padded) requests; their own outputs back."""
        self._count(batch)
        if len(batch) == 1:
            return [self._run_alone(batch[0].feed)]
        feeds = [item.feed for item in batch]
        lengths: list[int] = []
        if self.plan is not None:
            feeds, lengths = pad_feeds(feeds, self.plan)
        merged = {name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]}
        try:
            outputs = self.run(merged)
        except InputError:
            # One member the model refuses must not fail the others: run them one by one.
            return [self._run_alone(item.feed) for item in batch]
        parts = split_rows(outputs, [item.rows for item in batch])
        if self.plan is not None:
            parts = [cut_outputs(p, n, self.plan) for p, n in zip(parts, lengths, strict=True)]
        return list(parts)
