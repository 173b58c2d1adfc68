"""A simulated fleet (``edgebento simulate``) in its own process, and a registry holding v1 and
v2 of ``tiny``, for rollout tests at sizes real agents cannot reach here."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cloud_sync.protocol import Topics
from cloud_sync.registry import Registry
from cloud_sync.store import open_store
from cloud_sync.watch import FleetWatch
from tests.support.agent import make_pack
from tests.support.services import Mosquitto

REPO = Path(__file__).resolve().parents[2]
CLI = "import sys; from edgebento.cli import main; sys.exit(main())"


def cli_process(*args: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", CLI, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=log.open("ab"),
    )


def publish_v1_v2(store_url: str, tmp: Path, model: Path, key: Path) -> None:
    registry = Registry(open_store(store_url))
    for version in (1, 2):
        registry.publish(make_pack(tmp / f"v{version}", model, key, version), key=key)


@dataclass
class Simulated:
    """``edgebento simulate`` with ``devices`` devices, started by ``start()``."""

    broker: Mosquitto
    prefix: str
    trust: Path
    log: Path
    devices: int
    first: int = 0
    flags: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def names(self) -> list[str]:
        return [f"sim-{i:05d}" for i in range(self.first, self.first + self.devices)]

    def start(self, timeout: float = 60) -> Simulated:
        self.process = cli_process(
            "simulate",
            "--devices",
            str(self.devices),
            "--first",
            str(self.first),
            "--broker",
            self.broker.url,
            "--prefix",
            self.prefix,
            "--trust",
            str(self.trust),
            "--telemetry-s",
            "1",
            *self.flags,
            log=self.log,
        )
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        line = self.process.stdout.readline().decode()
        assert line.startswith("ready"), (line, self.log.read_text())
        assert time.monotonic() < deadline
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def versions(broker: Mosquitto, prefix: str, devices: list[str]) -> dict[str, int | None]:
    """The version each device's retained status reports (None: no status)."""
    with FleetWatch(broker.url, Topics(prefix), set(devices)).start(settle_s=0) as watch:
        deadline = time.monotonic() + 10
        while len(watch.statuses) < len(devices) and time.monotonic() < deadline:
            watch.take_changed()  # else wait() returns at once after the first status: a spin
            if len(watch.statuses) < len(devices):
                watch.wait(0.2)
        return {
            d: (s.model.version if (s := watch.statuses.get(d)) and s.model else None)
            for d in devices
        }


def wait_for(broker: Mosquitto, prefix: str, want: dict[str, int], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (have := versions(broker, prefix, list(want))) != want:
        assert time.monotonic() < deadline, f"devices report {have}, expected {want}"
        time.sleep(0.5)
