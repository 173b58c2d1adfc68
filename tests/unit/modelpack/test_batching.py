from __future__ import annotations

import asyncio
import threading

import numpy as np

from modelpack import Pack, Predictor
from modelpack.errors import OverloadError
from modelpack.serving.batching import Batcher
from modelpack.serving.padding import sequence_axis
from tests.unit.bentos.seqmodel import tokens


class _Endpoint:
    def __init__(self, pack: Pack) -> None:
        self.predictor = Predictor.from_pack(pack)
        self.plan = sequence_axis(pack.manifest)


def _slow_run(endpoint: _Endpoint, gate: threading.Event):
    """The real model, held at the first batch until the test lets it go (so a queue forms)."""

    def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        gate.wait(5)
        return endpoint.predictor.run(feed, validate=False)

    return run


async def _submit_all(batcher: Batcher, feeds: list[dict[str, np.ndarray]], gate: threading.Event):
    def rows(feed: dict[str, np.ndarray]) -> int:
        return len(next(iter(feed.values())))

    tasks = [asyncio.ensure_future(batcher.submit(feeds[0], rows(feeds[0])))]
    await asyncio.sleep(0.02)  # the first is running (held at the gate) ...
    tasks += [asyncio.ensure_future(batcher.submit(f, rows(f))) for f in feeds[1:]]
    await asyncio.sleep(0.05)  # ... and the rest queue behind it
    gate.set()
    return await asyncio.gather(*tasks)


def test_queued_requests_run_as_one_batch_and_each_gets_its_own_rows(mlp_pack: Pack) -> None:
    endpoint = _Endpoint(mlp_pack)
    gate = threading.Event()
    batcher = Batcher(_slow_run(endpoint, gate), max_rows=64)
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((n, 8)).astype(np.float32)} for n in (1, 2, 1, 3, 1)]
    results = asyncio.run(_submit_all(batcher, feeds, gate))
    assert batcher.batches == 2  # the first alone (nobody waited for it), then the other four
    for feed, result in zip(feeds, results, strict=True):
        alone = endpoint.predictor.run(feed)
        assert result["probs"].shape == (feed["x"].shape[0], 3)
        np.testing.assert_allclose(result["probs"], alone["probs"], rtol=1e-5, atol=1e-6)


def test_a_full_queue_and_a_passed_deadline_are_refused_and_nothing_else_is(
    mlp_pack: Pack,
) -> None:
    endpoint = _Endpoint(mlp_pack)
    gate = threading.Event()
    batcher = Batcher(_slow_run(endpoint, gate), max_rows=64, max_queue=2)
    feed = {"x": np.zeros((1, 8), np.float32)}

    async def flood() -> list[object]:
        import time

        first = asyncio.ensure_future(batcher.submit(feed))
        await asyncio.sleep(0.02)  # running, held at the gate
        late = asyncio.ensure_future(batcher.submit(feed, deadline=time.monotonic() + 0.01))
        waiting = asyncio.ensure_future(batcher.submit(feed))
        refused = asyncio.ensure_future(batcher.submit(feed))  # the queue holds 2
        await asyncio.sleep(0.05)
        gate.set()
        return await asyncio.gather(first, late, waiting, refused, return_exceptions=True)

    first, late, waiting, refused = asyncio.run(flood())
    assert isinstance(first, dict) and isinstance(waiting, dict)
    assert isinstance(late, OverloadError) and late.reason == "deadline"
    assert isinstance(refused, OverloadError) and refused.reason == "queue_full"


def test_the_row_cap_splits_a_queue_into_several_batches(mlp_pack: Pack) -> None:
    endpoint = _Endpoint(mlp_pack)
    gate = threading.Event()
    batcher = Batcher(_slow_run(endpoint, gate), max_rows=4)
    feeds = [{"x": np.full((1, 8), i, dtype=np.float32)} for i in range(9)]
    results = asyncio.run(_submit_all(batcher, feeds, gate))
    assert batcher.batches == 3  # 1 alone, then 4 + 4
    assert [r["probs"].shape[0] for r in results] == [1] * 9


def test_sequences_of_different_lengths_are_padded_per_batch_and_cut_back(seq_pack: Pack) -> None:
    endpoint = _Endpoint(seq_pack)
    gate = threading.Event()
    batcher = Batcher(_slow_run(endpoint, gate), plan=endpoint.plan, max_rows=64)
    feeds = [tokens(n, seed) for seed, n in enumerate((4, 40, 2, 38, 3, 6))]
    results = asyncio.run(_submit_all(batcher, feeds, gate))
    # The first alone; the queue sorted into a run of short and a run of long sequences.
    assert batcher.batches == 3
    for feed, result in zip(feeds, results, strict=True):
        alone = endpoint.predictor.run(feed)
        length = feed["input_ids"].shape[1]
        assert result["hidden"].shape == (1, length, 4)
        np.testing.assert_allclose(result["hidden"], alone["hidden"], rtol=1e-6)
        np.testing.assert_allclose(result["pooled"], alone["pooled"], rtol=1e-5, atol=1e-6)


def test_a_short_deadline_behind_the_batch_is_refused_at_the_next_boundary(
    mlp_pack: Pack,
) -> None:
    """One request per batch, so the worker takes only the head of the queue; a request
    further back whose deadline passed is still answered at the next batch boundary."""
    endpoint = _Endpoint(mlp_pack)
    gate = threading.Event()
    batcher = Batcher(_slow_run(endpoint, gate), max_rows=1)
    feed = {"x": np.zeros((1, 8), np.float32)}

    async def queue_up() -> list[object]:
        import time

        first = asyncio.ensure_future(batcher.submit(feed))
        await asyncio.sleep(0.02)  # running, held at the gate
        ahead = [asyncio.ensure_future(batcher.submit(feed)) for _ in range(3)]
        late = asyncio.ensure_future(batcher.submit(feed, deadline=time.monotonic() + 0.01))
        behind = asyncio.ensure_future(batcher.submit(feed))
        for name, task in (("ahead1", ahead[1]), ("late", late)):
            task.add_done_callback(lambda _, n=name: order.append(n))
        await asyncio.sleep(0.05)
        gate.set()
        return await asyncio.gather(first, *ahead, late, behind, return_exceptions=True)

    order: list[str] = []
    *served_before, late, behind = asyncio.run(queue_up())
    assert all(isinstance(r, dict) for r in (*served_before, behind))
    assert isinstance(late, OverloadError) and late.reason == "deadline"
    assert order == ["late", "ahead1"]  # refused with the first batch after its deadline
    assert batcher.batches == 5  # the late one never ran
