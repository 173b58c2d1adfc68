"""Whose fault a failed run is, through ``bentoml serve``: a run failure that a known-good input
does not reproduce is the client's (400, counted ``rejected``, never in the error rate a
rollout reads); one that the known-good input also hits is the model's (500, an ``error``).
And the time limits by phase: a body not received in its limit is a 408, counted."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

from benchmarks.serving_common import Process, import_to_store, start_bento
from tests.support import fault_models
from tests.support.bento_servers import read_answer

pytestmark = pytest.mark.integration

GOOD_A, GOOD_B = np.array([[6, 4]], np.int64), np.array([[3, 2]], np.int64)
BODY_TIMEOUT_S = 2


def _serve(
    work: Path,
    keys: tuple[Path, Path],
    name: str,
    model: Path,
    samples: dict[str, np.ndarray],
    **env: str,
) -> Process:
    from modelpack import Samples, create_pack

    create_pack(model, work / name, name=name, version=1, samples=Samples(samples, {}), key=keys[0])
    tag = import_to_store(work / name, keys[1], work / f"bentoml-{name}")
    return start_bento(work / f"bentoml-{name}", tag, work, EDGEBENTO_WORKERS="1", **env)


@pytest.fixture(scope="module")
def servers(
    tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]
) -> Iterator[Callable[[str], str]]:
    """Servers started on first use: ``divide`` (golden a=[[6, 4]], b=[[3, 2]]), ``threes``
    (a batch must be a multiple of 3; golden 3 rows), ``broken`` (divide_in_threes with a
    golden sample of 1 row, which the model cannot run: it is broken for 1-row inputs)."""
    work = tmp_path_factory.mktemp("faults")
    started: dict[str, Process] = {}
    three = np.arange(12, dtype=np.float32).reshape(3, 4)
    specs: dict[str, Any] = {
        "divide": (fault_models.divide, {"a": GOOD_A, "b": GOOD_B}),
        "threes": (fault_models.rows_of_three, {"x": three}),
        "broken": (fault_models.divide_in_threes, {"a": GOOD_A, "b": GOOD_B}),
    }

    def get(name: str) -> str:
        if name not in started:
            build, samples = specs[name]
            started[name] = _serve(
                work,
                keys,
                name,
                build(work / f"{name}.onnx"),
                samples,
                EDGEBENTO_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S),
            )
        return started[name].url

    try:
        yield get
    finally:
        for proc in started.values():
            proc.stop()


def _counts(url: str) -> dict[str, float]:
    """edgebento_requests_total by outcome, and the reasons of the 4xx and 5xx counters."""
    text = httpx.get(url + "/metrics", timeout=30).text
    found: dict[str, float] = {}
    pattern = (
        r"^edgebento_(requests|input_rejected|request_errors)_total\{[^}]*"
        r'(?:outcome|reason)="([^"]+)"[^}]*\} ([0-9.e+]+)$'
    )
    for kind, label, value in re.findall(pattern, text, re.M):
        key = f"{kind}:{label}"
        found[key] = found.get(key, 0.0) + float(value)
    return found


def _tensor(**inputs: np.ndarray) -> dict[str, Any]:
    return {"inputs": {k: v.tolist() for k, v in inputs.items()}}


def _oip(**inputs: np.ndarray) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": k, "shape": list(v.shape), "datatype": "INT64", "data": v.ravel().tolist()}
            for k, v in inputs.items()
        ]
    }


def test_integer_division_by_zero_is_the_clients_400_even_as_the_first_request(
    servers: Callable[[str], str],
) -> None:
    url = servers("divide")
    zero = np.array([[0, 1]], np.int64)
    first = httpx.post(url + "/predict", json=_tensor(a=GOOD_A, b=zero), timeout=30)
    assert first.status_code == 400, first.text
    assert first.json()["reason"] == "invalid" and "division by zero" in first.json()["error"]
    oip = httpx.post(url + "/v2/models/divide/infer", json=_oip(a=GOOD_A, b=zero), timeout=30)
    assert oip.status_code == 400, oip.text
    good = httpx.post(url + "/predict", json=_tensor(a=GOOD_A, b=GOOD_B), timeout=30)
    assert good.status_code == 200 and good.json()["outputs"]["y"] == [[2, 2]]
    # After a success of the same shape class, the same answer.
    again = httpx.post(url + "/predict", json=_tensor(a=GOOD_A, b=zero), timeout=30)
    assert again.status_code == 400
    counts = _counts(url)
    assert counts.get("requests:error", 0) == 0, counts
    assert counts["requests:rejected"] == 3 and counts["input_rejected:invalid"] == 3


def test_a_batch_that_must_be_a_multiple_of_3_is_the_clients_fault_at_1_and_2_rows(
    servers: Callable[[str], str],
) -> None:
    """The shape class includes the batch dim: a 3-row success says nothing for 1 row."""
    url = servers("threes")
    rows = {n: np.arange(4 * n, dtype=np.float32).reshape(n, 4) for n in (1, 2, 3, 6)}
    before = httpx.post(url + "/predict", json=_tensor(x=rows[1]), timeout=30)
    assert before.status_code == 400, before.text
    for n in (3, 6):
        ok = httpx.post(url + "/predict", json=_tensor(x=rows[n]), timeout=30)
        assert ok.status_code == 200 and ok.json()["outputs"]["y"] == rows[n].tolist()
    for n in (1, 2):
        after = httpx.post(url + "/predict", json=_tensor(x=rows[n]), timeout=30)
        assert after.status_code == 400, after.text
        assert "cannot be reshaped" in after.json()["error"]
    counts = _counts(url)
    assert counts.get("requests:error", 0) == 0 and counts["requests:rejected"] == 3, counts


def test_a_flood_of_client_faults_neither_counts_as_errors_nor_hides_a_broken_model(
    servers: Callable[[str], str],
) -> None:
    """On a model broken for 1-row inputs (its own golden sample fails): 300 requests the
    client got wrong (b = 0 on 3 rows, a class that ran) are 400s and no error; the 30 1-row
    requests among them, which the known-good input also fails on, are each a 500 and an
    error. The error rate a rollout reads (errors / (ok + errors)) sees exactly the model's."""
    url = servers("broken")
    three_a = np.array([[6, 4], [8, 2], [9, 3]], np.int64)
    three_b = np.array([[3, 2], [4, 1], [3, 3]], np.int64)
    ok = httpx.post(url + "/predict", json=_tensor(a=three_a, b=three_b), timeout=30)
    assert ok.status_code == 200, ok.text
    bad = _tensor(a=three_a, b=np.array([[3, 0], [4, 1], [3, 3]], np.int64))
    lone = _tensor(a=GOOD_A, b=GOOD_B)
    plan = [lone if i % 11 == 5 else bad for i in range(330)]
    with httpx.Client(timeout=60) as http, ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda doc: http.post(url + "/predict", json=doc), plan))
    got = {doc is lone: set() for doc in plan}
    for doc, answer in zip(plan, statuses, strict=True):
        got[doc is lone].add(answer.status_code)
    assert got == {False: {400}, True: {500}}, got
    counts = _counts(url)
    assert counts["requests:error"] == 30 and counts["request_errors:internal"] == 30, counts
    assert counts["requests:rejected"] == 300 and counts["requests:ok"] == 1, counts


def test_huge_timeouts_are_a_400_counted_as_the_clients(servers: Callable[[str], str]) -> None:
    url = servers("divide")
    before = _counts(url)
    for value in ("1" + "0" * 400, "1e400", "inf", "nan", "-5", "0", "9" * 100):
        answer = httpx.post(
            url + "/predict",
            json=_tensor(a=GOOD_A, b=GOOD_B),
            headers={"x-timeout-ms": value},
            timeout=30,
        )
        assert answer.status_code == 400 and answer.json()["reason"] == "invalid", value
    huge = {**_oip(a=GOOD_A, b=GOOD_B), "parameters": {"timeout": 10**400}}
    answer = httpx.post(url + "/v2/models/divide/infer", json=huge, timeout=30)
    assert answer.status_code == 400 and answer.json()["reason"] == "invalid", answer.text
    after = _counts(url)
    assert after.get("requests:error", 0) == before.get("requests:error", 0), after
    assert after["requests:rejected"] - before.get("requests:rejected", 0) == 8


def test_a_slow_upload_is_a_408_counted_as_the_clients(servers: Callable[[str], str]) -> None:
    """A body sent a byte a second: 408 reason timeout once the body's limit passes (it was a
    504 run_timeout after 32 s, uncounted, as if the model never answered)."""
    url = servers("divide")
    before = _counts(url)
    parts = urlsplit(url)
    body = b'{"inputs": {"a": [[6, 4]], "b": [[3, 2]]}}'
    head = (
        f"POST /predict HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(head)
        start = time.monotonic()
        sock.settimeout(1.0)
        answer = b""
        for byte in body:
            try:
                sock.sendall(bytes([byte]))
                answer += sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if answer:
                break
        took = time.monotonic() - start
        sock.settimeout(30)
        answer = read_answer(sock, answer)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"reason":"timeout"' in answer, answer
    # Not before the body's limit; that it is the limit's 408, not the run timeout's 504 (30 s
    # later), the status says.
    assert took >= BODY_TIMEOUT_S, took
    after = _counts(url)
    assert after["input_rejected:timeout"] - before.get("input_rejected:timeout", 0) == 1, after
    assert after.get("requests:error", 0) == before.get("requests:error", 0)
