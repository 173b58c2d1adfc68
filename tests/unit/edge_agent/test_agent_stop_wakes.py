"""A stop (SIGTERM's handler calls ``request_stop``) wakes the agent's main loop at once.

The old loop polled: it slept at most 0.2 s at a time, so a stop began up to 0.2 s after the
signal. Whether a stop begins at once or 0.2 s later cannot be told from outside without timing
it, so this tests the waiting itself: the loop sleeps until its next heartbeat (an hour here),
once, and the stop ends that sleep. On the old code the loop never slept on the agent's wake-up
(it polled an Event), and this test fails at its first assertion.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from edge_agent.agent import Agent
from edge_agent.config import AgentConfig
from edge_agent.wakeup import Wakeup

HOUR = 3600.0


class _Sleeps(Wakeup):
    """A wake-up that says when someone sleeps on it, and for how long they mean to."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts: list[float | None] = []
        self.sleeping = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.timeouts.append(timeout)
        self.sleeping.set()
        return super().wait(timeout)


def test_the_main_loop_sleeps_until_its_heartbeat_and_a_stop_wakes_it(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    config = AgentConfig(device="d", data_dir=tmp_path, trust=[keys[1]])
    config.limits = config.limits.model_copy(update={"telemetry_interval": HOUR})
    agent = Agent(config)  # never started: no broker, the loop only ticks and sleeps
    agent._wake.close()
    sleeps = agent._wake = _Sleeps()
    loop = threading.Thread(target=agent.run_forever, daemon=True)
    loop.start()
    try:
        assert sleeps.sleeping.wait(60), "the loop never slept on the agent's wake-up"
        (timeout,) = sleeps.timeouts  # one sleep, until the next heartbeat: no polling
        assert timeout is not None and timeout > HOUR - 60, sleeps.timeouts
        agent.request_stop()
        loop.join(60)
        assert not loop.is_alive(), "the stop did not end the loop's sleep"
        assert len(sleeps.timeouts) == 1, sleeps.timeouts  # woken, and out at once
    finally:
        agent.request_stop()
        agent.stop(flush_s=0)


def test_a_wakeup_given_from_a_signal_handler_ends_the_sleep_it_interrupts() -> None:
    """SIGTERM's handler runs in the thread that sleeps: setting a ``threading.Event`` there can
    deadlock on the lock that thread holds, so the agent's wake-up takes no lock."""
    wakeup = Wakeup()
    previous = signal.signal(signal.SIGUSR1, lambda *_: wakeup.set())
    try:
        threading.Timer(0.0, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        assert wakeup.wait(HOUR) is True  # woken by the handler, within the wait
        assert wakeup.wait(0) is False  # ... once: the wake-up was taken
    finally:
        signal.signal(signal.SIGUSR1, previous)
        wakeup.close()
