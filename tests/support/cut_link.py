"""A TCP proxy in front of a broker whose link a test cuts: a link that drops, for real.

``cut()`` closes every connection through it now (the client and the broker see the socket
closed, no DISCONNECT: what a broker restarted or a dropped uplink looks like). ``stall(after_s)``
makes the current connections swallow what the client sends from now on, and cuts each
``after_s`` after the first thing swallowed: a message on its way when the link went.
``flaky(n, after_s)`` makes each of the next ``n`` connections pass only the client's first
chunk (its CONNECT: the broker accepts it), swallow the rest, and cuts it ``after_s`` after it
opened: a link that drops soon after each reconnect.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable

from tests.support.services import LOOPBACK


class _Pair:
    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client, self.upstream = client, upstream
        self.swallow_after_first = False  # flaky: the CONNECT passes, the rest does not
        self.swallowing = False
        self.cut_after_s: float | None = None  # stall: cut this long after the first swallowed
        self.closed = threading.Event()

    def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for s in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()


class CutLink:
    def __init__(self, port: int) -> None:
        self._server = socket.create_server((LOOPBACK, 0))
        self.port: int = self._server.getsockname()[1]
        self._target = port
        self._pairs: list[_Pair] = []
        self._flaky: list[float] = []  # for each of the next connections: cut after this
        self._changed = threading.Condition()
        self.opened = 0  # connections through the link so far
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        """The broker's address through the link (what an ``AgentProcess`` is given)."""
        return f"mqtt://{LOOPBACK}:{self.port}"

    # --- what the test does -------------------------------------------------------------------

    def cut(self) -> None:
        with self._changed:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            self._cut(pair)

    def stall(self, after_s: float) -> None:
        with self._changed:
            for pair in self._pairs:
                pair.swallowing, pair.cut_after_s = True, after_s

    def flaky(self, connections: int, after_s: float) -> None:
        with self._changed:
            self._flaky = [after_s] * connections

    def wait_for(self, condition: Callable[[CutLink], bool], timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: condition(self), timeout)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._server.close()
        self.cut()

    # --- the proxy ----------------------------------------------------------------------------

    def _cut(self, pair: _Pair) -> None:
        if not pair.closed.is_set():
            pair.close()
            with self._changed:
                if pair in self._pairs:
                    self._pairs.remove(pair)
                self.cuts += 1
                self._changed.notify_all()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self._server.accept()
                upstream = socket.create_connection((LOOPBACK, self._target))
                pair = _Pair(client, upstream)
                with self._changed:
                    self._pairs.append(pair)
                    self.opened += 1
                    after = self._flaky.pop(0) if self._flaky else None
                    self._changed.notify_all()
                if after is not None:
                    pair.swallow_after_first = True
                    timer = threading.Timer(after, self._cut, (pair,))
                    timer.daemon = True
                    timer.start()
                threading.Thread(target=self._up, args=(pair,), daemon=True).start()
                threading.Thread(target=self._down, args=(pair,), daemon=True).start()

    def _up(self, pair: _Pair) -> None:
        with contextlib.suppress(OSError):
            while chunk := pair.client.recv(65536):
                with self._changed:
                    swallow = pair.swallowing
                    if pair.swallow_after_first:
                        pair.swallowing = True
                    start_cut, pair.cut_after_s = (
                        (pair.cut_after_s, None) if swallow else (None, pair.cut_after_s)
                    )
                if start_cut is not None:
                    timer = threading.Timer(start_cut, self._cut, (pair,))
                    timer.daemon = True
                    timer.start()
                if not swallow:
                    pair.upstream.sendall(chunk)
        self._cut(pair)

    def _down(self, pair: _Pair) -> None:
        with contextlib.suppress(OSError):
            while chunk := pair.upstream.recv(65536):
                pair.client.sendall(chunk)
        self._cut(pair)
