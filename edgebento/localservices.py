"""A Mosquitto broker of our own on a free loopback port, for the demo and the tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 15.0, host: str = LOOPBACK) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if not found:
        raise RuntimeError(
            "mosquitto is not installed: run 'make demo' or 'make test', which install it"
        )
    return found


@dataclass
class Mosquitto:
    """A Mosquitto broker of its own, on a free loopback port, that can be killed and restarted.

    With ``users`` (name -> password) it refuses anonymous clients, and its ACL confines each
    user to ``{prefix}/{user}/#`` (the device's own topics); ``admin`` may use every topic.
    """

    workdir: Path
    users: dict[str, str] | None = None
    prefix: str = "edgebento"
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{LOOPBACK}:{self.port}"

    def _write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        lines = [
            f"listener {self.port} {LOOPBACK}",
            "persistence true",
            f"persistence_location {self.workdir}/",
            "autosave_interval 1",
            "max_queued_messages 100000",
            # Nagle's algorithm holds a PUBACK-then-PUBLISH pair for a delayed ACK: 40 ms a hop.
            "set_tcp_nodelay true",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
        ]
        if os.geteuid() == 0:
            # As root Mosquitto drops to user "mosquitto", who cannot read pytest's private dirs.
            lines.append("user root")
        if self.users is None:
            lines.append("allow_anonymous true")
        else:
            passwd = self.workdir / "passwd"
            passwd.write_text("".join(f"{u}:{p}\n" for u, p in self.users.items()))
            passwd.chmod(0o600)
            subprocess.run(["mosquitto_passwd", "-U", str(passwd)], check=True)
            acl = self.workdir / "acl"
            acl.write_text(
                "user admin\ntopic readwrite #\n\n"
                f"pattern readwrite {self.prefix}/%u/#\n"
                f"pattern read {self.prefix}/group/#\n"
            )
            lines += ["allow_anonymous false", f"password_file {passwd}", f"acl_file {acl}"]
        conf = self.workdir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self) -> Mosquitto:
        conf = self._write_config()
        self.process = subprocess.Popen(
            [mosquitto_binary(), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=(self.workdir / "mosquitto.log").open("ab"),
        )
        wait_for_port(self.port)
        return self

    def kill(self) -> None:
        """kill -9: no clean shutdown, no last save."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


@contextlib.contextmanager
def running_mosquitto(workdir: Path, users: dict[str, str] | None = None) -> Iterator[Mosquitto]:
    broker = Mosquitto(workdir=workdir, users=users).start()
    try:
        yield broker
    finally:
        broker.stop()
