"""Free loopback ports for services of our own, and knowing that the service itself got one.

``free_port`` binds port 0 and closes it: the port is free only until someone binds it, and
another process may do so before the service does. ``wait_serving`` tells that apart (the
service exited with the port held elsewhere: ``PortTaken``) from a service that merely starts
slowly, so a caller can start it again on a new port.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import time
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A loopback port nothing holds now, below the kernel's range of ephemeral ports where one
    is free there: a port the kernel picks for ``bind(0)`` comes from the range it also gives
    outgoing connections, and one of those (an agent connecting to its broker) took such a port
    between the pick and the service's bind (bentoml serve: address in use, in CI)."""
    start, stop = _port_range()
    rng = random.SystemRandom()
    for _ in range(64):
        port = rng.randrange(start, stop)
        with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


SLICE_ENV = "EDGEBENTO_PORT_SLICE"


def _port_range() -> tuple[int, int]:
    """The 16,384 ports below the ephemeral range, or slice K of N of them where
    ``EDGEBENTO_PORT_SLICE=K/N`` says: processes that start services side by side (the test
    suite's workers, which set it) then never pick the same port between pick and bind."""
    low = _ephemeral_low()
    start = max(1024, low - 16384)
    k, n = _slice(os.environ.get(SLICE_ENV, ""))
    width = (low - start) // n
    return start + k * width, start + (k + 1) * width


def _slice(text: str) -> tuple[int, int]:
    """``"K/N"`` as (K, N) with 0 <= K < N <= 64; anything else is the whole range, (0, 1)."""
    k_text, _, n_text = text.partition("/")
    if k_text.isdigit() and n_text.isdigit() and 0 <= int(k_text) < int(n_text) <= 64:
        return int(k_text), int(n_text)
    return 0, 1


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux's default where /proc is not read)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


class PortTaken(RuntimeError):
    """A service could not bind its port: another process took it after ``free_port`` picked it
    (the port is free only until someone binds it)."""


def _bindable(port: int) -> bool:
    """Whether this port can be bound now, as a server binds it (SO_REUSEADDR, loopback)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def listens(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` itself has a TCP socket listening on ``port``: its socket inodes
    (/proc/PID/fd) against the listening sockets of /proc/net/tcp. None where there is no /proc
    to read (then only a connect can say something listens)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    inodes = set()
    for fd in fds:
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()  # local address "0100007F:1F90", state "0A" is LISTEN
                listening = cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port
                if listening and cols[9] in inodes:
                    return True
    return False


def wait_serving(process: subprocess.Popen[bytes], ports: list[int], timeout: float = 15.0) -> None:
    """Until ``process`` listens on every one of ``ports`` (checked as its own sockets where
    /proc says, else by a connect). Raises ``PortTaken`` if it exited while another process
    holds one of them, RuntimeError if it exited otherwise, TimeoutError after ``timeout``.

    A connect alone proves nothing for a port picked by ``free_port``: another process that
    took the port in between answers it, while the service exits on EADDRINUSE."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            taken = [p for p in ports if not _bindable(p)]
            if taken:
                raise PortTaken(f"port {taken[0]} was taken by another process")
            raise RuntimeError(f"the service exited with code {process.returncode}")
        owned = [listens(process.pid, p) for p in ports]
        if all(owned) or (None in owned and all(_accepts(p) for p in ports)):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {LOOPBACK}:{ports} after {timeout}s")


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=0.5):
        return True
    return False


def wait_for_port(port: int, timeout: float = 15.0, host: str = LOOPBACK) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")
