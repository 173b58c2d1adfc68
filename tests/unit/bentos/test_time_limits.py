"""Request time limits swept by one timer: a limit that passes cancels its task and is told
apart from any other cancellation; one ended in time never fires."""

from __future__ import annotations

import asyncio

import pytest

from bentos.time_limits import Limits


def test_a_limit_that_passes_cancels_the_task_and_is_told_as_its_own() -> None:
    limits = Limits(period_s=0.01)

    async def slow() -> str:
        limit = limits.arm(0.02)
        try:
            await asyncio.Event().wait()  # never set: only the limit ends it
        except asyncio.CancelledError:
            if not limits.end(limit):
                raise
            task = asyncio.current_task()
            assert task is not None and task.cancelling() == 0  # taken back: not cancelled
            return "timed out"
        raise AssertionError("unreachable")

    assert asyncio.run(slow()) == "timed out"


def test_another_cancellation_is_not_taken_for_the_limit() -> None:
    limits = Limits(period_s=0.01)
    seen: list[bool] = []

    async def client_goes_away() -> None:
        armed = asyncio.Event()

        async def request() -> None:
            limit = limits.arm(60)
            armed.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                seen.append(limits.end(limit))
                raise

        task = asyncio.create_task(request())
        await armed.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(client_goes_away())
    assert seen == [False]


def test_a_limit_ended_in_time_never_fires_and_the_sweep_stops() -> None:
    limits = Limits(period_s=0.01)

    async def quick() -> bool:
        limit = limits.arm(0.03)
        await asyncio.sleep(0)
        fired = limits.end(limit)
        loop = asyncio.get_running_loop()
        # Past the limit and a few sweeps: nothing is armed, so nothing fires and no sweep
        # stays due on this loop.
        stopped = loop.create_future()

        def check() -> None:
            if loop in limits._sweeping:
                loop.call_later(0.01, check)
            else:
                stopped.set_result(True)

        check()
        await stopped
        return fired or limit.fired

    assert asyncio.run(quick()) is False
