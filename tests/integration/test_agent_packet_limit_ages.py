"""A link that drops every connection at one age, past the old 10 s cap on the packet-limit
hold, through a real Mosquitto (``max_packet_size``): it teaches no bound, and the answer that
was on its way at the first drop arrives. (The review's repro: on the code before, the release
came at 10.25 to 11 s, within the second before each 11.1 s drop: three drops, a false bound, and
the answer refused.)
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent import Client
from tests.support.services import LOOPBACK, SmallPacketMosquitto

pytestmark = pytest.mark.integration

AGE_S = 11.1  # each connection is cut this long after it opens
BLACK_HOLE_S = 0.9  # ... and swallows what the client sends for this long before


class AgeLink:
    """A TCP proxy that swallows what the client sends from AGE_S - BLACK_HOLE_S after each
    connection opens and cuts it at AGE_S: a link that goes dark at one age of every connection
    (what was sent in its last second is never acknowledged)."""

    def __init__(self, port: int) -> None:
        self._server = socket.create_server((LOOPBACK, 0))
        self.port: int = self._server.getsockname()[1]
        self._target = port
        self._changed = threading.Condition()
        self._dark: set[socket.socket] = set()  # client sockets whose data is swallowed
        self._open: list[tuple[socket.socket, socket.socket]] = []
        self.cuts = 0
        self.darkened = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def wait_for(self, what: str, count: int, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: getattr(self, what) >= count, timeout)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._server.close()
        for pair in list(self._open):
            self._cut(pair)

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self._server.accept()
                pair = (client, socket.create_connection((LOOPBACK, self._target)))
                self._open.append(pair)
                for args in (pair, pair[::-1]):
                    threading.Thread(target=self._pump, args=args, daemon=True).start()
                for delay, then in ((AGE_S - BLACK_HOLE_S, self._darken), (AGE_S, self._cut)):
                    timer = threading.Timer(delay, then, (pair,))
                    timer.daemon = True
                    timer.start()

    def _darken(self, pair: tuple[socket.socket, socket.socket]) -> None:
        with self._changed:
            self._dark.add(pair[0])
            self.darkened += 1
            self._changed.notify_all()

    def _cut(self, pair: tuple[socket.socket, socket.socket]) -> None:
        with self._changed:
            if pair not in self._open:
                return
            self._open.remove(pair)
            self.cuts += 1
            self._changed.notify_all()
        for s in pair:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                if source not in self._dark:
                    sink.sendall(chunk)


def _session(tmp_path: Path, port: int, prefix: str) -> Any:
    from edge_agent.config import AgentConfig
    from edge_agent.session import Session

    config = AgentConfig(
        device="dev-f", broker=f"mqtt://127.0.0.1:{port}", data_dir=tmp_path,
        trust=[tmp_path / "unused.pub"], protocol="3.1.1", prefix=prefix,
    )  # fmt: skip
    return Session(config, will=(f"{prefix}/dev-f/status", {}), on_message=lambda _m: None)


def test_a_link_that_drops_at_one_age_past_the_old_cap_teaches_no_bound(
    small_broker: SmallPacketMosquitto, tmp_path: Path, topic_prefix: str
) -> None:
    """A 12 KB answer (the broker takes up to 16 KiB) sent as the first connection goes dark,
    cut at 11.1 s with the answer unacknowledged: the answer is the suspect. Small QoS 1
    messages every half second keep the link carrying data (PUBACKs) until it goes dark. Each
    later connection is cut at 11.1 s as well; the answer is released early in it (the last
    close was late), the broker acknowledges it, and it arrives: no bound, nothing refused."""
    link = AgeLink(small_broker.port)
    session = _session(tmp_path, link.port, topic_prefix)
    reader = Client(small_broker, v5=False)
    arrived: queue.Queue[Any] = reader.collect(f"{topic_prefix}/dev-f/answer")
    answer, stop = b"a" * 12_000, threading.Event()

    def refused(reason: str) -> None:
        arrived.put(reason)  # wakes the wait below: the old code's verdict

    def chatter() -> None:
        while not stop.wait(0.5):
            if session.connected:
                session.publish(f"{topic_prefix}/dev-f/small", b"x")

    try:
        with session:
            assert session.wait_connected(30)
            threading.Thread(target=chatter, daemon=True).start()
            assert link.wait_for("darkened", 1, timeout=60)
            session.publish(f"{topic_prefix}/dev-f/answer", answer, on_too_large=refused)
            got = arrived.get(timeout=120)
            assert not isinstance(got, str), got
            assert got.payload == answer
            assert link.cuts >= 1 and session.limit.bound is None and session.limit.refused == 0
    finally:
        stop.set()
        reader.close()
        link.close()
