"""A wake-up that a signal handler may give: a byte on a socket pair (the self-pipe trick).

``threading.Event.set`` takes a lock that the thread it would wake may hold at that moment (in
``wait`` or ``clear``), and a signal handler runs in that very thread: setting an Event from
SIGTERM's handler can deadlock the agent. Writing a byte takes no lock, so ``set`` may be called
from a signal handler, paho's thread or any other; ``wait`` sleeps in ``select`` until a byte
comes or the timeout passes, and takes every byte that came (a burst of sets is one wake-up).
"""

from __future__ import annotations

import contextlib
import selectors
import socket


class Wakeup:
    def __init__(self) -> None:
        self.reader, self._writer = socket.socketpair()
        self.reader.setblocking(False)
        self._writer.setblocking(False)
        # Made by the first ``wait``: a caller that selects on ``reader`` needs none.
        self._selector: selectors.BaseSelector | None = None

    def set(self) -> None:
        # OSError: full (a wake-up is pending anyway) or closed (stopping).
        with contextlib.suppress(OSError):
            self._writer.send(b"\0")

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until ``set`` or ``timeout`` seconds; whether it was woken. The wake-ups that
        came are taken: a ``set`` after this returns wakes the next ``wait``."""
        with contextlib.suppress(OSError, ValueError):  # closed: nothing left to wait for
            if self._selector is None:  # not select(): no limit on the descriptor's number
                self._selector = selectors.DefaultSelector()
                self._selector.register(self.reader, selectors.EVENT_READ)
            if self._selector.select(timeout):
                self.drain()
                return True
        return False

    def drain(self) -> None:
        """Take the wake-ups that came (for a caller that selects on ``reader`` itself)."""
        with contextlib.suppress(OSError):
            while self.reader.recv(4096):
                pass

    def close(self) -> None:
        if self._selector is not None:
            self._selector.close()
        self.reader.close()
        self._writer.close()
