"""A server's CPU split by thread, phase by phase: its event loop (each process's main thread)
against the rest (the model's thread, where ONNX Runtime runs: ``modelpack.serving.batching``).

What it tells apart: a flood whose goodput fell short of capacity because the refusals took the
loop's CPU, from one where the model itself ran slower per answer than in the capacity phase
beside it (other work on the host, the memory bus, the CPU's clock, or the loop's work evicting
the model's data from the caches). On this 2-core VM the conv-32 model of the overload
benchmark, alone on its CPU with nothing else there, took 1.64 to 2.34 ms a run from one second
to the next over 45 s (ONNX Runtime in a loop, CPU time per run, one figure a second).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ThreadCpu:
    loop: float  # CPU seconds of every process's main thread (the event loop)
    other: float  # of every other thread (the model's, ONNX Runtime's, BentoML's)

    def __sub__(self, other: ThreadCpu) -> ThreadCpu:
        return ThreadCpu(self.loop - other.loop, self.other - other.other)

    def __add__(self, other: ThreadCpu) -> ThreadCpu:
        return ThreadCpu(self.loop + other.loop, self.other + other.other)


def read(pid: int) -> ThreadCpu:
    """CPU seconds so far of ``pid``'s tree, split by thread. Only living threads count: one
    that ends between two readings takes its CPU with it (a server's loop and model threads
    live as long as it does)."""
    import psutil

    loop = other = 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return ThreadCpu(0.0, 0.0)
    for proc in procs:
        try:
            threads = proc.threads()
        except psutil.NoSuchProcess:
            continue
        for t in threads:
            if t.id == proc.pid:
                loop += t.user_time + t.system_time
            else:
                other += t.user_time + t.system_time
    return ThreadCpu(loop, other)


def per_answer(
    capacity: ThreadCpu, capacity_200s: float, flood: ThreadCpu, flood_200s: float
) -> dict[str, float | None]:
    """µs of each side per 200 in the capacity phases and in the flood, and the model's side
    flood over capacity: above 1, the model's thread did more CPU per answer in the flood."""

    def us(seconds: float, n: float) -> float | None:
        return round(1e6 * seconds / n, 1) if n else None

    model_cap, model_flood = us(capacity.other, capacity_200s), us(flood.other, flood_200s)
    return {
        "model_thread_us_per_200_capacity": model_cap,
        "model_thread_us_per_200_flood": model_flood,
        "model_thread_flood_over_capacity": (
            round(model_flood / model_cap, 3) if model_cap and model_flood else None
        ),
        "loop_us_per_200_capacity": us(capacity.loop, capacity_200s),
        "loop_us_per_200_flood": us(flood.loop, flood_200s),
    }
