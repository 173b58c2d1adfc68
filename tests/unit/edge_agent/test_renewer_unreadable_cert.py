"""A certificate file that cannot be read while the renewer waits (half written, damaged,
deleted) does not end the renewer (``edge_agent.identity.Renewer._run``): it goes by the last
window it read, says so in the status, and reads the file again at the next try. Before, the
read in the wait's clamp and in the failure's branch raised out of the ``identity-renewer``
thread, the status still said ``valid``, and repairing the file never brought it back.

The renewer's waits are driven by the test (``Steps``), one at a time: no race with the damage
or the repair, no sleeps."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cloud_sync.enroll import EnrollReply
from cloud_sync.fleet_ca import FleetCA, cert_pem, init_ca, new_key
from edge_agent.config import AgentConfig
from edge_agent.identity import KeyMaker, Renewer
from edge_agent.identity_files import IdentityFiles

DAY = 86400.0
HANG_S = 120.0  # only so that a broken renewer fails the test rather than hanging it


class Refusing:
    """A channel whose service answers every renewal "renewal_budget, retry in 2 s"."""

    def __init__(self) -> None:
        self.handler: Any = None
        self.asked = 0

    def route(self, topic_filter: str, handler: Any) -> None:
        self.handler = handler

    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> None:
        reply = EnrollReply(
            id=json.loads(payload)["id"],
            ok=False,
            reason="renewal_budget",
            error="spent",
            retry_after_s=2.0,
        )
        self.asked += 1
        self.handler(SimpleNamespace(payload=reply.model_dump_json()))

    def use_identity(self, cert_file: Path, key_file: Path) -> None: ...

    def wait_connected(self, timeout: float) -> bool:
        return True


class Steps:
    """Stands for ``wait_until``: each wait the renewer starts is counted and held until the
    test lets it end (``release``); the clamp is read at the wake, as ``wait_until`` does."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.started = self.released = 0
        self.died = False

    def wait(
        self, stop: threading.Event, target: float, latest: Callable[[], float] | None
    ) -> bool:
        with self.cond:
            self.started += 1
            mine = self.started
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.released >= mine or stop.is_set(), timeout=HANG_S)
        if latest is not None:
            latest()
        return stop.is_set()

    def reach(self, waits: int) -> None:
        """Until the renewer is in its ``waits``-th wait (or its thread died)."""
        with self.cond:
            self.cond.wait_for(lambda: self.started >= waits or self.died, timeout=HANG_S)
        assert not self.died, "the renewer thread died"
        assert self.started == waits

    def release(self) -> None:
        with self.cond:
            self.released += 1
            self.cond.notify_all()

    def stop(self, renewer: Renewer) -> None:
        """The renewer stopped, its wait woken, its thread ended."""
        renewer.stop()
        with self.cond:
            self.cond.notify_all()
        renewer._thread.join(HANG_S)
        assert not renewer._thread.is_alive()


@pytest.fixture
def steps() -> Iterator[Steps]:
    steps, previous = Steps(), threading.excepthook

    def hook(args: Any) -> None:
        if args.thread is not None and args.thread.name == "identity-renewer":
            with steps.cond:
                steps.died = True
                steps.cond.notify_all()
        previous(args)

    threading.excepthook = hook
    try:
        yield steps
    finally:
        threading.excepthook = previous


def _damage(cert: Path) -> None:
    cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n")


@pytest.mark.parametrize("damage", [_damage, Path.unlink], ids=["damaged", "deleted"])
def test_an_unreadable_certificate_during_a_wait_does_not_end_the_renewer(
    tmp_path: Path, steps: Steps, damage: Callable[[Path], None]
) -> None:
    init_ca(tmp_path / "ca")
    ca = FleetCA.load(tmp_path / "ca")
    cert = ca.sign_device_csr(KeyMaker().csr(new_key(), "wait-a"), "wait-a", 600 / DAY)
    files = IdentityFiles(tmp_path / "identity")
    files.dir.mkdir()
    good = cert_pem(cert)
    files.cert.write_bytes(good)
    config = AgentConfig(device="wait-a", data_dir=tmp_path, trust=[tmp_path / "signing.pub"])
    channel = Refusing()
    renewer = Renewer(config, channel, files, lambda *_: None, wait=steps.wait)
    renewer._thread.start()
    try:
        steps.reach(1)  # until the renewal point
        steps.release()
        steps.reach(2)  # refused, and waiting to try again
        assert channel.asked == 1 and "trying again" in files.read_status()["reason"]
        damage(files.cert)
        steps.release()  # the clamp and the failure read the file: it cannot be read
        steps.reach(3)
        status = files.read_status()
        assert channel.asked == 2 and status["state"] == "valid", status
        assert status["reason"].startswith("the certificate on disk cannot be read: "), status
        assert "trying again" in status["reason"], status
        files.cert.write_bytes(good)  # repaired
        steps.release()
        steps.reach(4)
        status = files.read_status()
        assert channel.asked == 3 and "cannot be read" not in status["reason"], status
        assert renewer._thread.is_alive()
    finally:
        steps.stop(renewer)


def test_a_certificate_never_read_is_tried_again_at_the_backoffs_longest(
    tmp_path: Path, steps: Steps
) -> None:
    """No window read yet and none readable (deleted before the renewer's first read): the
    renewer logs, waits the backoff's longest and tries to renew (a new certificate would
    replace the file), again and again while refused; it never returns."""
    files = IdentityFiles(tmp_path / "identity")
    files.dir.mkdir()
    config = AgentConfig(device="wait-b", data_dir=tmp_path, trust=[tmp_path / "signing.pub"])
    channel = Refusing()
    renewer = Renewer(config, channel, files, lambda *_: None, wait=steps.wait)
    renewer._thread.start()
    try:
        for waits in (1, 2, 3):
            steps.reach(waits)
            assert channel.asked == waits - 1
            steps.release()
        steps.reach(4)
        assert renewer._thread.is_alive()
    finally:
        steps.stop(renewer)
