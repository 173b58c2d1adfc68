"""The serving benchmarks pin every server to CPUs of its own and the load generator to the
others (``benchmarks/pinning.py``): really served, edgebento's ``bentoml serve`` (its arbiter,
its worker, the worker's event loop and ONNX Runtime threads), the bare uvicorn app and the
seed's Flask app (whose ONNX Runtime pinned a thread of its own pool to the generator's CPU
until it ran on one thread, as every other server does) run on
the server's CPUs only, with one worker per server CPU; the benchmark's own process (the
open-loop generator, and wrk it starts) on the generator's. Unpinned, the generator's CPU came
out of the server's under a flood."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest

from benchmarks.pinning import Pinning, generator_side, split, tree_affinity
from benchmarks.serving_common import (
    Process,
    import_to_store,
    start_bare_asgi,
    start_bento,
    start_flask,
)
from modelpack import generate_keypair
from modelpack.writer import create_pack
from tests.support import models

pytestmark = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="disjoint CPUs need two of them"
)


@pytest.fixture(scope="module")
def pinned(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Pinning, dict[str, Process]]]:
    work = tmp_path_factory.mktemp("bench-pinning")
    model = models.mlp(work / "mlp.onnx")
    key, pub = generate_keypair(work / "keys")
    create_pack(model, work / "pack", name="mlp", version=1, key=key)
    tag = import_to_store(work / "pack", pub, work / "bentoml")
    pinning = split()
    started: dict[str, Process] = {}
    try:
        with generator_side(pinning):
            started["edgebento"] = start_bento(work / "bentoml", tag, work, pinning=pinning)
            started["bare_asgi"] = start_bare_asgi(model, work, pinning.workers, pinning)
            started["flask"] = start_flask(model, work, pinning, threads=1)
        yield pinning, started
    finally:
        for proc in started.values():
            proc.stop()


def test_the_split_is_disjoint_and_covers_the_cpus() -> None:
    pinning = split()
    assert pinning.disjoint
    assert set(pinning.server) | set(pinning.generator) == os.sched_getaffinity(0)
    assert split(server_cpus=1).workers == 1


PATHS = {"edgebento": "/predict", "bare_asgi": "/predict", "flask": "/api/predict"}
# The threads each server keeps once it has answered. Flask's werkzeug (threaded=True, HTTP/1.0)
# answers on a thread that ends with its connection, and its ONNX Runtime on one thread has no
# pool: after the answer only the main thread is sure to be there (CI once saw the request's
# thread, and once not).
LASTING_THREADS = {"edgebento": 2, "bare_asgi": 2, "flask": 1}


@pytest.mark.parametrize("name", sorted(PATHS))
def test_every_thread_of_a_served_server_runs_on_the_server_cpus(
    pinned: tuple[Pinning, dict[str, Process]], name: str
) -> None:
    pinning, servers = pinned
    server = servers[name]
    # An answer first: the model's threads exist once it has run.
    answer = httpx.post(server.url + PATHS[name], json={"inputs": {"x": [[0.5] * 8]}}, timeout=30)
    assert answer.status_code == 200, answer.text
    found = tree_affinity(server.popen.pid)
    assert found["threads"] >= LASTING_THREADS[name], found
    assert found["cpus"] == [list(pinning.server)], found


def test_the_generator_side_is_left_as_it_was() -> None:
    pinning, before = split(), os.sched_getaffinity(0)
    with generator_side(pinning):
        assert os.sched_getaffinity(0) == set(pinning.generator)
    assert os.sched_getaffinity(0) == before
