"""The serving core through ``bentoml serve``, tried as hostile clients would: every finding of
the serving-core issue, triggered for real against the running process."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.serving_common import Process, import_to_store, start_bento
from tests.support import serving_models
from tests.support.bento_servers import read_answer, started_together

pytestmark = pytest.mark.integration


def _b64(array: np.ndarray) -> dict[str, Any]:
    return {
        "dtype": str(array.dtype),
        "shape": list(array.shape),
        "b64": base64.b64encode(array.tobytes()).decode(),
    }


def _serve(
    work: Path, keys: tuple[Path, Path], name: str, model: Path, **env: str
) -> partial[Process]:
    """The start of a server of ``model``, its pack made and imported."""
    from modelpack import create_pack

    create_pack(model, work / name, name=name, version=1, key=keys[0])
    tag = import_to_store(work / name, keys[1], work / "bentoml")
    return partial(start_bento, work / "bentoml", tag, work, EDGEBENTO_WORKERS="1", **env)


@pytest.fixture(scope="module")
def servers(
    tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]
) -> Iterator[dict[str, Process]]:
    """``add`` (a + b), and ``slow``: a model of about 2 ms a request, run one request at a
    time, behind a queue of 8."""
    add = tmp_path_factory.mktemp("serving-add")
    slow = tmp_path_factory.mktemp("serving-slow")
    starts = {
        "add": _serve(add, keys, "add", serving_models.add_two(add / "add.onnx")),
        "slow": _serve(
            slow,
            keys,
            "slow",
            serving_models.slow(slow / "slow.onnx", depth=128),
            EDGEBENTO_MAX_QUEUE="8",
            EDGEBENTO_MAX_BATCH="1",
            EDGEBENTO_DEADLINE_S="0.5",
            EDGEBENTO_CACHE_BYTES=str(1 << 20),
            EDGEBENTO_THREADS="1",
        ),
    }
    with started_together(starts) as running:
        yield running


@pytest.fixture(scope="module")
def add(servers: dict[str, Process]) -> str:
    return servers["add"].url


@pytest.fixture(scope="module")
def slow_server(servers: dict[str, Process]) -> Process:
    return servers["slow"]


@pytest.fixture(scope="module")
def slow(slow_server: Process) -> str:
    return slow_server.url


def _predict(url: str, inputs: dict[str, Any], **kw: Any) -> httpx.Response:
    return httpx.post(url + "/predict", json={"inputs": inputs}, timeout=30, **kw)


def _ones(rows: int, value: float = 1.0) -> np.ndarray:
    return np.full((rows, 4), value, np.float32)


def test_a_batch_never_returns_another_clients_tensor(add: str) -> None:
    """a of 2 rows and b of 0 rows (as b64), beside other clients' 1-row requests."""
    hostile = {"a": _b64(_ones(2, 100.0)), "b": _b64(np.zeros((0, 4), np.float32))}

    def good(i: int) -> httpx.Response:
        return _predict(add, {"a": _ones(1, i).tolist(), "b": _ones(1, 0.5).tolist()})

    with ThreadPoolExecutor(16) as pool:
        for _ in range(5):
            bad = [pool.submit(_predict, add, hostile) for _ in range(4)]
            goods = {i: pool.submit(good, i) for i in range(24)}
            for future in bad:
                reply = future.result()
                assert reply.status_code == 400 and reply.json()["reason"] == "rows"
            for i, future in goods.items():
                reply = future.result()
                assert reply.status_code == 200
                assert reply.json()["outputs"]["y"] == [[i + 0.5] * 4]
    alone = _predict(add, hostile)  # alone, it was a 500
    assert alone.status_code == 400 and "same number of rows" in alone.json()["error"]


def test_inconsistent_rows_fail_only_their_own_request(add: str) -> None:
    hostile = {"a": _ones(1).tolist(), "b": _ones(3).tolist()}
    with ThreadPoolExecutor(16) as pool:
        bad = [pool.submit(_predict, add, hostile) for _ in range(8)]
        goods = [
            pool.submit(_predict, add, {"a": [[1, 2, 3, 4]], "b": [[1, 1, 1, 1]]})
            for _ in range(24)
        ]
        assert {f.result().json()["reason"] for f in bad} == {"rows"}
        assert all(f.result().json()["outputs"]["y"] == [[2, 3, 4, 5]] for f in goods)


@pytest.mark.parametrize("shape", [[2**62, 4], [2**64, 4], [2**31, 2**31], [-1, 4], [3, 4, 1]])
def test_overflowing_and_absurd_shapes_are_a_400(add: str, shape: list[int]) -> None:
    tensor = {"dtype": "float32", "shape": shape, "b64": base64.b64encode(b"\0" * 16).decode()}
    reply = _predict(add, {"a": tensor, "b": tensor})
    assert reply.status_code in (400, 413), reply.text
    assert reply.json()["reason"] in ("too_large", "shape")


def _rss_tree(pid: int) -> int:
    import psutil

    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def test_a_19_mb_json_body_is_refused_before_it_is_parsed(add: str) -> None:
    """Before, it raised a worker's RSS by 268 MB before it was refused."""
    port = int(add.rsplit(":", 1)[1])
    import psutil

    pid = next(
        c.pid
        for c in psutil.net_connections("tcp")
        if c.laddr and c.laddr.port == port and c.status == "LISTEN" and c.pid
    )
    body = b'{"inputs": {"a": [' + b"[0.1, 0.2, 0.3, 0.4], " * 880_000 + b'[0, 0, 0, 0]], "b": []}}'
    assert len(body) > 19e6
    before = _rss_tree(pid)
    reply = httpx.post(add + "/predict", content=body, timeout=60)
    grown = _rss_tree(pid) - before
    assert reply.status_code == 413 and reply.json()["reason"] == "too_large"
    assert "b64" in reply.json()["error"]  # it says what to do instead
    assert grown < 100e6, f"RSS grew by {grown / 1e6:.0f} MB"


# --- isolation: each request, sent among others, gets exactly what it gets alone -----------

_rows = st.integers(min_value=0, max_value=3)
_tensor = st.one_of(
    st.tuples(st.just("json"), _rows, st.sampled_from([4, 4, 4, 3])),
    st.tuples(st.just("b64"), _rows, st.sampled_from([4, 4, 2])),
)


def _make(kind: str, rows: int, width: int, seed: int) -> Any:
    array = np.random.default_rng(seed).integers(-50, 50, (rows, width)).astype(np.float32)
    return array.tolist() if kind == "json" else _b64(array)


@st.composite
def _request(draw: st.DrawFn) -> dict[str, Any]:
    seed = draw(st.integers(0, 2**16))
    a, b = draw(_tensor), draw(_tensor)
    if draw(st.booleans()):  # mostly valid: the same rows on both
        b = (b[0], a[1], 4)
        a = (a[0], a[1], 4)
    return {"a": _make(*a, seed), "b": _make(*b, seed + 1)}


def _answer(reply: httpx.Response) -> tuple[int, Any]:
    doc = reply.json()
    return reply.status_code, doc.get("outputs", doc.get("reason"))


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(requests=st.lists(_request(), min_size=8, max_size=24))
def test_concurrent_requests_each_get_the_answer_they_get_alone(
    add: str, requests: list[dict[str, Any]]
) -> None:
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: _answer(_predict(add, r)), requests))
    alone = [_answer(_predict(add, r)) for r in requests]
    assert together == alone
    assert all(status in (200, 400) for status, _ in alone)


# --- overload -------------------------------------------------------------------------------


def test_a_flood_gets_only_200_and_503_with_retry_after(slow: str) -> None:
    rng = np.random.default_rng(0)

    def ask(i: int) -> httpx.Response:
        x = rng.standard_normal((1, 256)).astype(np.float32)
        return _predict(slow, {"x": _b64(x)})

    with httpx.Client() as warm:
        warm.get(slow + "/metadata")
    replies: list[httpx.Response] = []
    # 64 at once against a queue of 8 and a 2 ms model overload it only while these client
    # threads outpace the server; on a machine busy with other tests one flood of them may not
    # (all 200s, seen in CI), so floods go on until one overflowed the queue, at most 10.
    for _ in range(10):
        with ThreadPoolExecutor(64) as pool:
            replies += pool.map(ask, range(256))
        if {200, 503} <= {r.status_code for r in replies}:
            break
    statuses = {r.status_code for r in replies}
    assert statuses <= {200, 503} and 503 in statuses and 200 in statuses
    for reply in replies:
        if reply.status_code == 503:
            assert reply.headers["retry-after"] == "1"
            assert reply.json()["reason"] in ("queue_full", "deadline")
    text = httpx.get(slow + "/metrics").text
    assert "edgebento_overload_rejected_total" in text
    assert "edgebento_queue_wait_seconds_bucket" in text and "edgebento_queue_depth" in text
    # Normal service right after.
    assert _predict(slow, {"x": [[0.0] * 256]}).status_code == 200


def test_a_full_queue_refuses_before_the_body_arrives(slow: str) -> None:
    """Under a flood, a request the queue cannot take is answered from its headers alone: the
    503 comes back while the body it announced has not been sent."""
    import socket
    import threading
    import time
    from urllib.parse import urlsplit

    stop = threading.Event()

    def flood() -> None:
        rng = np.random.default_rng()  # new inputs each time: the server's cache is on
        with httpx.Client() as http:
            while not stop.is_set():
                x = rng.standard_normal((1, 256)).astype(np.float32)
                http.post(slow + "/predict", json={"inputs": {"x": _b64(x)}})

    parts = urlsplit(slow)
    head = (
        f"POST /predict HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
    ).encode()
    threads = [threading.Thread(target=flood) for _ in range(32)]
    for t in threads:
        t.start()
    answers = []
    time.sleep(1)  # the flood is on
    try:
        give_up = time.monotonic() + 30
        while time.monotonic() < give_up:
            with socket.create_connection((parts.hostname, parts.port), timeout=1) as sock:
                sock.sendall(head)  # and never the body
                try:
                    answer = read_answer(sock)
                except TimeoutError:  # it found room and waits for its body, rightly
                    continue
            answers.append(answer)
            if answer.startswith(b"HTTP/1.1 503"):
                break
    finally:
        stop.set()
        for t in threads:
            t.join()
    refused = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
    assert refused, answers[-1][:200] if answers else "no answer without a body"
    assert b'"reason":"queue_full"' in refused[0].replace(b" ", b"") or b"deadline" in refused[0]
    assert b"retry-after: 1" in refused[0].lower()
    assert _predict(slow, {"x": [[0.0] * 256]}).status_code == 200


def test_a_client_may_ask_for_a_shorter_deadline(add: str) -> None:
    """Shorter deadlines beside normal requests: only the short ones are refused. On the fast
    model with the default deadline, so that what the ``slow`` server learned about its run
    times under the flood tests (its run-cost estimate) cannot refuse the normal ones too."""

    def short(i: int) -> httpx.Response:
        inputs = {"a": _ones(1, i).tolist(), "b": _ones(1).tolist()}
        return _predict(add, inputs, headers={"x-timeout-ms": "0.001"})

    def normal(i: int) -> httpx.Response:
        return _predict(add, {"a": _ones(1, i).tolist(), "b": _ones(1).tolist()})

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(short if i % 5 == 0 else normal, i) for i in range(100)]
        replies = [(i, f.result()) for i, f in enumerate(futures)]
    normals = [(i, r) for i, r in replies if i % 5]
    failed = [(r.status_code, r.text[:200]) for _, r in normals if r.status_code != 200]
    assert not failed, failed
    assert all(r.json()["outputs"]["y"] == [[i + 1.0] * 4] for i, r in normals)
    shorts = [r for i, r in replies if i % 5 == 0]
    assert {r.status_code for r in shorts} == {503}
    assert {r.json()["reason"] for r in shorts} == {"deadline"}
    bad = _predict(add, {"a": [[0.0] * 4], "b": [[0.0] * 4]}, headers={"x-timeout-ms": "soon"})
    assert bad.status_code == 400 and bad.json()["reason"] == "invalid"


def test_the_result_cache_answers_a_repeated_request(slow: str) -> None:
    x = {"x": [[0.25] * 256]}
    first, second = _predict(slow, x).json(), _predict(slow, x).json()
    assert first["outputs"] == second["outputs"]
    text = httpx.get(slow + "/metrics").text
    hits = [line for line in text.splitlines() if line.startswith("edgebento_cache_hits_total")]
    assert hits and float(hits[0].split()[-1]) >= 1


def test_unknown_paths_and_methods_are_404_and_405(add: str) -> None:
    assert httpx.get(add + "/v2/nothing").status_code == 404
    assert httpx.delete(add + "/predict").status_code in (404, 405)
    assert httpx.get(add + "/predict").status_code == 405


def test_a_client_that_leaves_mid_body_costs_nothing_and_counts_no_error(add: str) -> None:
    import re
    import socket
    from urllib.parse import urlsplit

    def counted(outcome: str) -> float:
        text = httpx.get(add + "/metrics").text
        pattern = rf'edgebento_requests_total\{{[^}}]*outcome="{outcome}"[^}}]*\}} ([0-9.e+]+)'
        return sum(float(v) for v in re.findall(pattern, text))

    before = counted("error"), counted("ok")
    parts = urlsplit(add)
    head = (
        f"POST /predict HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    ).encode()
    for _ in range(20):
        with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
            sock.sendall(head + b'{"inputs":')  # 10 of the 1000 bytes, then gone
    reply = _predict(add, {"a": [[1.0] * 4], "b": [[2.0] * 4]})
    assert reply.status_code == 200 and reply.json()["outputs"]
    assert (counted("error"), counted("ok")) == (before[0], before[1] + 1)


def test_the_workers_loop_and_model_threads_run_under_sched_batch(slow_server: Process) -> None:
    """The service puts its event loop's thread, and the model's thread it starts later, under
    SCHED_BATCH (EDGEBENTO_SCHED_BATCH is on by default): read back from the kernel."""
    import os

    import psutil

    server = psutil.Process(slow_server.popen.pid)
    workers = [
        p
        for p in server.children(recursive=True)
        if "_bentoml_impl.worker" in " ".join(p.cmdline())
    ]
    assert workers

    def threads() -> list[tuple[float, int]]:
        """(CPU seconds, id) of the workers' threads besides their event loop's."""
        return [
            (t.user_time + t.system_time, t.id)
            for w in workers
            for t in w.threads()
            if t.id != w.pid
        ]

    rng = np.random.default_rng()  # new inputs: the server's cache is on
    # A 1.4 ms model runs on the model's thread, not inline on the loop: requests until that
    # thread has clearly worked (the flood tests before may have done it already).
    for _ in range(100):
        if max(threads())[0] > 0.1:
            break
        for _ in range(20):
            x = rng.standard_normal((1, 256)).astype(np.float32)
            assert _predict(slow_server.url, {"x": _b64(x)}).status_code == 200
    for worker in workers:
        assert os.sched_getscheduler(worker.pid) == os.SCHED_BATCH  # the event loop's thread
    # The model's thread: the busiest one besides the loop's (Python 3.11 names no OS thread).
    busiest_cpu, busiest = max(others := threads())
    assert busiest_cpu > 0.1, others
    assert os.sched_getscheduler(busiest) == os.SCHED_BATCH


def test_places_held_for_admitted_requests_are_all_given_back(slow: str) -> None:
    """An inference admitted from its headers holds a place in the queue (of 8 here) until the
    app admits it again: clients that leave mid-body, bodies that are not JSON and requests
    answered whole give every place back, so the queue still takes requests after 48 of them
    (a place kept by each would have refused all after the eighth)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(slow)

    def head(length: int) -> bytes:
        return (
            f"POST /predict HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
        ).encode()

    for i in range(16):
        with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
            sock.sendall(head(1000) + b'{"inputs":')  # then gone mid-body
        with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
            sock.sendall(head(9) + b"not json!")
            assert read_answer(sock).startswith(b"HTTP/1.1 400")
        assert _predict(slow, {"x": [[float(i)] * 256]}).status_code == 200
