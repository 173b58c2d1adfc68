"""The controller's record of each rollout's last save (cloud_sync.rollout_record), kept outside
the bucket. Over any run of saves (some killed before their header), whole older states put
back and fresh loads, a put-back older state is always refused and the state the controller
last left always loads. The record file is the controller's own, but whatever it holds (not
JSON, other types, deep nesting, a huge file, not a file at all) a load ends with one clear
error naming it, never a crash, and never falls back to trusting the bucket."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_sync.rollout_record import FILE_NAME, MAX_BYTES, SaveRecord, default_state_dir
from cloud_sync.rollout_state import RolloutState
from cloud_sync.rollout_store import load_state, rollout_key, save_state, wave_key
from cloud_sync.sealed import public_of
from cloud_sync.store import LocalStore
from modelpack.errors import ConfigError, StoreError
from tests.unit.cloud_sync.test_rollout_save_format import SIGNER, _state

TRUSTED = public_of(SIGNER)
STATES = ("updating", "done", "failed", "offline")
# save (the waves it changes, killed before its header), put back the state after an earlier
# save (an index into those kept), or a fresh load (a controller restarted on this machine).
SAVE = st.tuples(st.just("save"), st.sets(st.integers(0, 3), max_size=4), st.booleans())
PUT_BACK = st.tuples(st.just("put_back"), st.integers(0, 20), st.just(False))
LOAD = st.tuples(st.just("load"), st.just(0), st.just(False))
STEPS = st.lists(st.one_of(SAVE, PUT_BACK, LOAD), max_size=10)


def _documents(store: LocalStore, state: RolloutState) -> dict[str, bytes]:
    keys = [rollout_key(state.id)] + [wave_key(state.id, i) for i in range(state.wave_count)]
    return {key: store.get_bytes(key) for key in keys}


def _restore(store: LocalStore, documents: dict[str, bytes]) -> None:
    for key, data in documents.items():
        store.put_bytes(key, data)


class _Killed(Exception):
    pass


class _Killable(LocalStore):
    """A bucket whose write of ``kill_at`` never happens: the controller is killed just before."""

    kill_at: str | None = None

    def create(self, key: str, data: bytes) -> str:
        if key == self.kill_at:
            raise _Killed(key)
        return super().create(key, data)

    def replace(self, key: str, data: bytes, etag: str) -> str:
        if key == self.kill_at:
            raise _Killed(key)
        return super().replace(key, data, etag)


@settings(max_examples=30, deadline=None)
@given(steps=STEPS)
def test_a_put_back_older_state_is_refused_and_the_last_one_always_loads(
    steps: list[tuple[str, object, bool]],
) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        store, record = _Killable(Path(tmp) / "bucket"), SaveRecord.in_dir(Path(tmp) / "state")
        state = _state(40)
        state._record = record  # as new_rollout(record=...) leaves it
        save_state(store, state, SIGNER)
        kept = [(1, _documents(store, state))]  # (its header's save, every document)
        for step, (op, arg, kill) in enumerate(steps):
            if op == "save":
                for index in arg:  # type: ignore[attr-defined]
                    state.move(state.wave(index)[0], STATES[step % len(STATES)], f"step {step}")
                if kill:  # after its waves, before its header (and so its record of it)
                    store.kill_at = rollout_key(state.id)
                    with pytest.raises(_Killed):
                        save_state(store, state, SIGNER)
                    store.kill_at = None
                    state = _loaded(store, record, state)
                else:
                    save_state(store, state, SIGNER)
                    kept.append((state.save_seq, _documents(store, state)))
            elif op == "put_back":
                now = _documents(store, state)
                seq, documents = kept[int(arg) % len(kept)]  # type: ignore[call-overload]
                last = record.recorded(store.url, state.id)
                assert last is not None
                _restore(store, documents)
                if seq < last:
                    with pytest.raises(StoreError, match="older state put back"):
                        load_state(store, state.id, TRUSTED, record)
                    assert record.recorded(store.url, state.id) == last
                    _restore(store, now)  # the operator puts the bucket right
                    state = _loaded(store, record, state)
                else:  # the last save that reached its header: what the record stands behind
                    state = _loaded(store, record, state, same=False)
            else:
                state = _loaded(store, record, state)
        save_state(store, state, SIGNER)  # reaches its header: newer than any state kept
        _restore(store, kept[0][1])
        with pytest.raises(StoreError, match="older state put back"):
            load_state(store, state.id, TRUSTED, record)


def _loaded(
    store: LocalStore, record: SaveRecord, state: RolloutState, same: bool = True
) -> RolloutState:
    """A fresh load with the record: accepted, and (``same``) as the controller left it."""
    loaded = load_state(store, state.id, TRUSTED, record)
    if same:
        assert [d.model_dump() for d in loaded.devices] == [d.model_dump() for d in state.devices]
    recorded = record.recorded(store.url, state.id)
    # A save killed before its header may have left its waves ahead of the recorded header.
    assert recorded is not None and recorded <= loaded.save_seq
    return loaded


@pytest.fixture
def stored(tmp_path: Path) -> tuple[LocalStore, str]:
    store, state = LocalStore(tmp_path / "bucket"), _state(20)
    save_state(store, state, SIGNER)
    return store, state.id


def _refused(store: LocalStore, rollout_id: str, record: SaveRecord, why: str) -> None:
    before = record.path.read_bytes() if record.path.is_file() else None
    with pytest.raises(ConfigError) as refused:
        load_state(store, rollout_id, TRUSTED, record)
    message = str(refused.value)
    assert str(record.path) in message and "not a valid record of rollout saves" in message
    assert why in message and "\n" not in message
    if before is not None:
        assert record.path.read_bytes() == before  # left as it was, for the operator to see


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "not JSON"),
        (b"\xff\xfe garbage", "not JSON"),
        (b"[" * 200_000 + b"]" * 200_000, "not JSON"),  # deeper than the parser's stack
        (b'{"stores": {"s": {"r": ' + b"9" * 5000 + b"}}}", "not JSON"),  # past the digit limit
        (b"[]", "the document"),
        (b'{"schema_version": 2, "stores": {}}', "schema_version"),
        (b'{"stores": {"s": {"r": "3"}}}', "stores.s.r"),
        (b'{"stores": {"s": {"r": true}}}', "stores.s.r"),
        (b'{"stores": {"s": {"r": 3.0}}}', "stores.s.r"),
        (b'{"stores": {"s": {"r": -1}}}', "stores.s.r"),
        (b'{"stores": {"s": {"r": 9223372036854775808}}}', "stores.s.r"),
        (b'{"stores": []}', "stores"),
        (b'{"stores": {}, "trust": "bucket"}', "trust"),
    ],
)
def test_a_record_file_that_is_not_one_stops_the_load_with_its_path_and_why(
    stored: tuple[LocalStore, str], tmp_path: Path, data: bytes, why: str
) -> None:
    record = SaveRecord.in_dir(tmp_path / "state")
    record.path.parent.mkdir()
    record.path.write_bytes(data)
    _refused(*stored, record, why)


def test_a_huge_or_special_record_file_is_refused_without_reading_it_all(
    stored: tuple[LocalStore, str], tmp_path: Path
) -> None:
    record = SaveRecord.in_dir(tmp_path / "state")
    record.path.parent.mkdir()
    with record.path.open("wb") as file:
        file.truncate(MAX_BYTES + 1)  # sparse: no 16 MiB written
    _refused(*stored, record, f"over {MAX_BYTES} bytes")
    record.path.unlink()
    os.mkfifo(record.path)  # no writer: a blocking read would hang the load
    _refused(*stored, record, "not a regular file")
    record.path.unlink()
    record.path.mkdir()
    _refused(*stored, record, "not a regular file")


@settings(max_examples=60, deadline=None)
@given(
    data=st.one_of(
        st.binary(max_size=200),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
            max_leaves=12,
        ).map(lambda doc: json.dumps({"stores": doc}).encode()),
    )
)
def test_whatever_the_record_holds_a_load_ends_in_a_state_or_one_clear_error(data: bytes) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        store, state = LocalStore(Path(tmp) / "bucket"), _state(4)
        save_state(store, state, SIGNER)
        record = SaveRecord.in_dir(Path(tmp) / "state")
        record.path.parent.mkdir()
        record.path.write_bytes(data)
        try:
            loaded = load_state(store, state.id, TRUSTED, record)
        except ConfigError as exc:
            assert "not a valid record of rollout saves" in str(exc)
        except StoreError as exc:  # a valid record of a later save of this very rollout
            assert "older state put back" in str(exc)
        else:
            assert record.recorded(store.url, state.id) == loaded.save_seq == 1


def test_a_state_dir_that_cannot_be_made_is_one_clear_error(
    stored: tuple[LocalStore, str], tmp_path: Path
) -> None:
    (tmp_path / "file").write_text("")
    record = SaveRecord.in_dir(tmp_path / "file" / "state")
    with pytest.raises(
        ConfigError, match=r"cannot keep the record of rollout saves in .*--state-dir"
    ):
        load_state(*stored, TRUSTED, record)


def test_the_state_dir_is_the_flag_else_the_variable_else_xdg_else_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEBENTO_STATE_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert SaveRecord.in_dir(tmp_path / "flag").path == tmp_path / "flag" / FILE_NAME
    assert SaveRecord.in_dir(None).path == tmp_path / "env" / FILE_NAME
    monkeypatch.delenv("EDGEBENTO_STATE_DIR")
    assert default_state_dir() == tmp_path / "xdg" / "edgebento"
    monkeypatch.setenv("XDG_STATE_HOME", "relative")  # ignored, as the XDG spec says
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_state_dir() == tmp_path / "home" / ".local" / "state" / "edgebento"
