"""The CRL on disk read by its writers and the enrollment service (``cloud_sync.crl_disk``,
``cloud_sync.crl_ledger``): read once and checked on the object everything is taken from, its
ledger parsed strictly (a clear ConfigError, never a crash nor a value no writer puts there),
its last good copy put back when it is damaged, and every file fsynced with its directory."""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_sync.crl_disk import (
    RESTORES,
    BrokerCrl,
    crl_pem,
    last_good,
    read_disk_crl,
    write_crl,
)
from cloud_sync.crl_ledger import LATEST, LEDGER, _der_utf8, ledger_extension
from cloud_sync.crl_publish import publish_crl
from cloud_sync.fleet_ca import FleetCA, init_ca
from cloud_sync.identity_store import IdentityStore
from cloud_sync.rollout_state import DEVICE_ID
from cloud_sync.store import open_store
from modelpack.errors import ConfigError
from tests.unit.cloud_sync.test_crl_ledger import ca  # the same CA, its own CRL files

__all__ = ["ca"]

HOUR = 3600.0


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> FleetCA:
    out = tmp_path_factory.mktemp("other-ca")
    init_ca(out)
    return FleetCA.load(out)


def _with_ledger(ca: FleetCA, raw: bytes, number: int = 5) -> bytes:
    """A CRL the CA signed whose ledger extension holds ``raw``."""
    ext = x509.UnrecognizedExtension(x509.ObjectIdentifier(LEDGER), raw)
    return ca.crl([(0x1234, dt.datetime.now(dt.UTC))], number=number, extensions=[ext])


def _json(text: str) -> bytes:
    return _der_utf8(text)


def _is_sound(disk: Any) -> bool:
    """What a ledger that reads may hold: what a writer puts there, nothing else."""
    times = [*disk.not_after.values(), *disk.devices.values()]
    return (
        all(0 < s < 1 << 160 for s in disk.not_after)
        and all(DEVICE_ID.fullmatch(d) for d in disk.devices)
        and all(isinstance(t, float) and math.isfinite(t) and 0 <= t <= LATEST for t in times)
    )


HOSTILE = {
    "nested 100k deep": '{"v":1,"not_after":' + "[" * 100_000 + "]" * 100_000 + ',"devices":{}}',
    "a 400-digit notAfter": '{"v":1,"not_after":{"1":1' + "0" * 400 + '},"devices":{}}',
    "a 5000-digit notAfter": '{"v":1,"not_after":{"1":1' + "0" * 5000 + '},"devices":{}}',
    "NaN": '{"v":1,"not_after":{"1":NaN},"devices":{}}',
    "Infinity": '{"v":1,"not_after":{},"devices":{"cam-1":Infinity}}',
    "1e999": '{"v":1,"not_after":{},"devices":{"cam-1":1e999}}',
    "a negative serial": '{"v":1,"not_after":{"-5":2e9},"devices":{}}',
    "serial 0": '{"v":1,"not_after":{"0":2e9},"devices":{}}',
    "a 161-bit serial": '{"v":1,"not_after":{"1' + "0" * 40 + '":2e9},"devices":{}}',
    "a path and an escape": '{"v":1,"not_after":{},"devices":{"../x\\u001b[2J":1}}',
    "a time past 9999": '{"v":1,"not_after":{},"devices":{"cam-1":3e11}}',
    "a negative time": '{"v":1,"not_after":{"1f":-1},"devices":{}}',
    "a time as a string": '{"v":1,"not_after":{"1f":"2e9"},"devices":{}}',
    "v 99": '{"v":99,"not_after":{},"devices":{}}',
    "no devices": '{"v":1,"not_after":{}}',
    "a field of its own": '{"v":1,"not_after":{},"devices":{},"x":1}',
    "a list": "[1]",
    "not JSON": "{",
}


@pytest.mark.parametrize("text", HOSTILE.values(), ids=list(HOSTILE))
def test_a_hostile_ledger_is_refused_as_config_error_by_every_reader_and_never_re_signed(
    ca: FleetCA, tmp_path: Path, text: str
) -> None:
    """On the previous code the nesting and the long integers escaped as RecursionError and
    OverflowError, and the others were read as written (and signed into the next CRL)."""
    crl = tmp_path / "crl.pem"
    planted = _with_ledger(ca, _json(text))
    crl.write_bytes(planted)
    with pytest.raises(ConfigError, match="ledger"):
        read_disk_crl(ca, crl)
    with pytest.raises(ConfigError, match="ledger"):
        BrokerCrl(ca, crl).read()
    ids = IdentityStore(open_store(str(tmp_path / "store")), ca)
    with pytest.raises(ConfigError, match="ledger"):
        publish_crl(ca, ids, crl, None)
    assert crl.read_bytes() == planted  # nothing of it signed into a CRL of the CA's


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
near_keys = st.one_of(
    st.from_regex(r"-?[0-9a-fA-F]{0,42}", fullmatch=True),
    st.text(max_size=12),
    st.from_regex(DEVICE_ID.pattern, fullmatch=True),
)
near_times = st.one_of(st.floats(), st.integers(-(10**30), 10**30), st.text(max_size=4), st.none())
near_docs = st.fixed_dictionaries(
    {
        "v": st.one_of(st.just(1), st.integers(-3, 300), st.floats(), st.text(max_size=2)),
        "not_after": st.one_of(st.dictionaries(near_keys, near_times, max_size=6), json_values),
        "devices": st.one_of(st.dictionaries(near_keys, near_times, max_size=6), json_values),
    }
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=st.one_of(st.binary(max_size=300), near_docs.map(json.dumps).map(_json)))
def test_any_ledger_bytes_read_as_a_sound_ledger_or_a_config_error(
    ca: FleetCA, tmp_path: Path, raw: bytes
) -> None:
    crl = tmp_path / "crl.pem"
    crl.write_bytes(_with_ledger(ca, raw))
    try:
        disk = read_disk_crl(ca, crl)
    except ConfigError:
        return
    assert _is_sound(disk)


@pytest.mark.parametrize(
    ("not_after", "devices"),
    [({0: 2e9}, {}), ({1 << 160: 2e9}, {}), ({1: math.nan}, {}), ({}, {"../x\x1b[2J": 1.0})],
)
def test_the_writer_refuses_to_sign_a_ledger_its_reader_would_refuse(
    not_after: dict[int, float], devices: dict[str, float]
) -> None:
    with pytest.raises(ConfigError, match="ledger"):
        ledger_extension(not_after, devices)


class _SwapOnCheck:
    """The CA's certificate, except that the first use of its public key (the signature check
    of a CRL just read) first renames ``evil`` over ``path``: where a racing rename lands
    between the read that is checked and any later read of the file."""

    def __init__(self, cert: Any, path: Path, evil: bytes) -> None:
        self._cert, self._path, self._evil, self.armed = cert, path, evil, True

    def public_key(self) -> Any:
        if self.armed:
            self.armed = False
            swap = self._path.with_name("evil.tmp")
            swap.write_bytes(self._evil)
            os.replace(swap, self._path)
        return self._cert.public_key()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cert, name)


def test_a_crl_swapped_after_its_checked_read_is_never_signed_into_the_next(
    ca: FleetCA, other: FleetCA, tmp_path: Path
) -> None:
    """On the previous code the CRLNumber and the ledger came from a second, unchecked read:
    another key's CRL renamed in between had its ledger signed into the next CRL (a device
    never revoked refused for ever, a revoked one's revocation dropped)."""
    crl, now = tmp_path / "crl.pem", dt.datetime.now(dt.UTC).timestamp()
    ids = IdentityStore(open_store(str(tmp_path / "store")), ca)
    publish_crl(ca, ids, crl, None, {0x1234: now + 300 * 86400}, {"thief-1": now}, first=True)
    evil = crl_pem(other, [], 0, {0x1234: 1.0}, {"healthy-1": 4.0e9})
    for read in (lambda c: read_disk_crl(c, crl), lambda c: BrokerCrl(c, crl).read()):
        raced = FleetCA(ca.paths, ca.key, _SwapOnCheck(ca.cert, crl, evil))
        disk = read(raced)
        assert (disk.devices.keys(), disk.number) == ({"thief-1"}, 1)
        publish_crl(ca, ids, crl, None)  # the file is the CA's again
    raced = FleetCA(ca.paths, ca.key, _SwapOnCheck(ca.cert, crl, evil))
    publish_crl(raced, IdentityStore(open_store(str(tmp_path / "store")), raced), crl, None)
    after = read_disk_crl(ca, crl)
    assert set(after.devices) == {"thief-1"} and 0x1234 in after.entries
    assert after.not_after[0x1234] > now + 299 * 86400


def test_a_damaged_crl_is_replaced_by_the_last_good_copy_and_a_bad_copy_is_never_used(
    ca: FleetCA, other: FleetCA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    crl, now = tmp_path / "broker" / "crl.pem", dt.datetime.now(dt.UTC).timestamp()
    ids = IdentityStore(open_store(str(tmp_path / "store")), ca)
    publish_crl(ca, ids, crl, None, {0x77: now + HOUR}, {"cam-9": now}, first=True)
    assert last_good(crl).read_bytes() == crl.read_bytes()
    good = crl.read_bytes()
    damages: dict[str, bytes | None] = {
        "truncated": good[: len(good) // 2],
        "empty": b"",
        "garbage": os.urandom(500),
        "another CA's": other.crl([], number=9),
        "missing": None,
    }
    for name, damage in damages.items():
        before = RESTORES[str(crl)]
        if damage is None:
            crl.unlink()
        else:
            crl.write_bytes(damage)
        with caplog.at_level(logging.ERROR, "cloud_sync.crl_disk"):
            publish_crl(ca, ids, crl, None)
        disk = read_disk_crl(ca, crl)
        assert 0x77 in disk.entries and "cam-9" in disk.devices, name
        assert RESTORES[str(crl)] == before + 1, name
        assert "put back the last good copy" in caplog.text
        caplog.clear()
    # A last good copy that is not the CA's is never put back: the writer refuses, as before.
    crl.write_bytes(b"")
    last_good(crl).write_bytes(other.crl([], number=99))
    with pytest.raises(ConfigError, match="nor is the last good copy"):
        publish_crl(ca, ids, crl, None)
    assert crl.read_bytes() == b""


def test_the_crl_and_its_copy_are_fsynced_before_and_after_their_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the previous code nothing was fsynced: after a power cut the renamed CRL could be
    empty (the rename on disk before the data), and the broker's next SIGHUP dropped its CRL."""
    seen: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def spy_fsync(fd: int) -> None:
        seen.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def spy_replace(src: Any, dst: Any) -> None:
        seen.append(("replace", str(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    crl = tmp_path / "crl.pem"
    write_crl(crl, b"x")
    for target in (crl, last_good(crl)):
        at = seen.index(("replace", str(target)))
        file_synced, dir_synced = seen[at - 1], seen[at + 1]
        assert file_synced[0] == "fsync" and file_synced[1].startswith(str(tmp_path) + "/.")
        assert dir_synced == ("fsync", str(tmp_path))
