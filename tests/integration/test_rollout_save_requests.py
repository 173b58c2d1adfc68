"""What a save of a 2,000-device rollout costs in S3 requests, against moto's S3 server through
real boto3 calls: one conditional PUT per changed wave and one for the header, never a HEAD or a
read-back; a writer that changed a document since makes the save fail, before the header."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cloud_sync.rollout_store import load_state, rollout_key, save_state, wave_key
from cloud_sync.s3store import S3Store
from cloud_sync.sealed import public_of
from modelpack.errors import ConflictError
from tests.support.services import MotoS3
from tests.unit.cloud_sync.test_rollout_save_format import SIGNER, _state


class Requests:
    """Each request boto3 sends on the wire: (method, key, conditional header, body bytes)."""

    def __init__(self, store: S3Store) -> None:
        self.sent: list[tuple[str, str, str, int]] = []
        store.client.meta.events.register("before-send.s3", self._record)

    def _record(self, request: Any, **_kw: Any) -> None:
        headers = request.headers
        condition = "If-Match" if "If-Match" in headers else ""
        condition = "If-None-Match" if "If-None-Match" in headers else condition
        key = request.url.split("?", 1)[0].split("/p/", 1)[-1]
        size = int(headers.get("Content-Length", 0))
        self.sent.append((request.method, key, condition, size))

    def take(self) -> list[tuple[str, str, str, int]]:
        sent, self.sent = self.sent, []
        return sent


@pytest.fixture
def store(s3_server: MotoS3, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> S3Store:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    return S3Store(s3_bucket, "p", endpoint_url=s3_server.endpoint_url)


def test_a_save_puts_each_changed_wave_and_the_header_once_and_reads_nothing(
    store: S3Store,
) -> None:
    requests, state = Requests(store), _state(2_000)
    save_state(store, state, SIGNER)
    first = requests.take()
    waves = [wave_key(state.id, i) for i in range(state.wave_count)]
    # The waves at once (in any order), then the header: all create-only.
    assert sorted((op, key, cond) for op, key, cond, _ in first[:-1]) == [
        ("PUT", key, "If-None-Match") for key in sorted(waves)
    ]
    assert first[-1][:3] == ("PUT", rollout_key(state.id), "If-None-Match")
    # Compact canonical JSON: under 100 bytes a device (the indented format took 159).
    assert sum(size for *_, size in first) / 2_000 < 100

    for device in state.wave(2)[:50]:
        state.move(device, "updating", None)
    save_state(store, state, SIGNER)
    assert [(op, key, cond) for op, key, cond, _ in requests.take()] == [
        ("PUT", wave_key(state.id, 2), "If-Match"),
        ("PUT", rollout_key(state.id), "If-Match"),
    ]
    save_state(store, state, SIGNER)  # nothing changed: the header alone (its save figures)
    assert [(op, key) for op, key, *_ in requests.take()] == [("PUT", rollout_key(state.id))]
    assert (state.saves.count, state.saves.requests) == (
        3,
        5 + 2 + 1,
    )  # 4 waves and the header, then 2, then 1
    assert state.saves.max_cpu_ms > 0  # its thread's CPU, kept beside the wall time

    loaded = load_state(store, state.id, public_of(SIGNER))
    assert [d.model_dump() for d in loaded.devices] == [d.model_dump() for d in state.devices]
    assert loaded.counts == state.counts == {"pending": 1_950, "updating": 50}


def test_a_document_changed_since_fails_the_save_at_that_put(store: S3Store) -> None:
    requests, state = Requests(store), _state(2_000)
    save_state(store, state, SIGNER)
    key = wave_key(state.id, 1)
    doc = json.loads(store.get_bytes(key))
    store.put_bytes(key, json.dumps(doc).encode())  # the same contents, a new etag
    requests.take()
    state.move(state.wave(1)[0], "done", "runs v2")
    with pytest.raises(ConflictError, match="written by someone else"):
        save_state(store, state, SIGNER)
    assert [(op, k, cond) for op, k, cond, _ in requests.take()] == [("PUT", key, "If-Match")]


def test_a_wave_written_by_another_fails_a_save_of_every_wave_before_its_header(
    store: S3Store,
) -> None:
    state = _state(2_000)
    taken = wave_key(state.id, 2)
    store.put_bytes(taken, b"{}")  # someone else's document where this rollout would write
    requests = Requests(store)
    with pytest.raises(ConflictError, match="written by someone else"):
        save_state(store, state, SIGNER)
    sent = requests.take()
    assert sorted(key for _, key, *_ in sent) == sorted(
        wave_key(state.id, i) for i in range(state.wave_count)
    )  # the other waves were written (each create-only); the header was not
    assert store.get_bytes(taken) == b"{}"
    assert not store.exists(rollout_key(state.id))
