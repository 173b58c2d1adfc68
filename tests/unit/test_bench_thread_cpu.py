"""``benchmarks/thread_cpu.py`` splits a server's CPU between its event loop (each process's main
thread) and its other threads (the model's): the overload benchmark reads it to tell a model that
ran slower in a flood from a loop that spent more on refusals."""

from __future__ import annotations

import os
import threading
import time

from benchmarks.thread_cpu import ThreadCpu, per_answer, read


def _burn(seconds: float) -> None:
    """Spend ``seconds`` of this thread's CPU (not wall time: the machine may be busy)."""
    start = time.thread_time()
    while time.thread_time() - start < seconds:
        pass


def test_the_main_threads_cpu_counts_as_the_loops() -> None:
    before = read(os.getpid())
    _burn(0.3)
    used = read(os.getpid()) - before
    assert used.loop >= 0.25
    assert used.other < 0.1


def test_a_living_threads_cpu_shows_on_the_other_side() -> None:
    go, done = threading.Event(), threading.Event()

    def work() -> None:
        go.wait()
        _burn(0.3)
        done.set()
        time.sleep(0.5)  # alive while the test reads it

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    before = read(os.getpid())
    go.set()
    done.wait()
    used = read(os.getpid()) - before
    assert used.other >= 0.25
    worker.join()


def test_per_answer_divides_each_side_by_its_phases_200s() -> None:
    capacity = ThreadCpu(loop=0.65, other=1.85)  # 1,000 answers
    flood = ThreadCpu(loop=0.9, other=1.9)  # 1,000 answers
    got = per_answer(capacity, 1000, flood, 1000)
    assert got["model_thread_us_per_200_capacity"] == 1850.0
    assert got["model_thread_us_per_200_flood"] == 1900.0
    assert got["model_thread_flood_over_capacity"] == round(1900 / 1850, 3)
    assert got["loop_us_per_200_capacity"] == 650.0
    assert got["loop_us_per_200_flood"] == 900.0
    assert per_answer(capacity, 0, flood, 0)["model_thread_flood_over_capacity"] is None
