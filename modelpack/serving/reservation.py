"""A place held in the model's queue for a request admitted from its headers alone."""

from __future__ import annotations

from typing import Protocol


class Places(Protocol):
    reserved: int  # the places held now (the batcher counts them as queued)


class Reservation:
    """A place in a Batcher's queue, held from the moment a request is admitted on its headers
    alone (``bentos.protocol_refusal``) until it is admitted again with its body, or ends.

    Under a flood the event loop reads the headers of many requests in one turn before any of
    their tasks runs: when one place had just freed, every one of them saw it free, was
    admitted, and all but one were then refused by the app, each after uvicorn had built the
    whole request (three times what a refusal from the headers costs; in the overload
    benchmark, half the refusals). A held place counts as queued, so the first request takes
    it and the others are refused from their headers. ``release`` is idempotent: the app
    releases it as it admits the request again, and the connection as its answer completes
    or it closes, whichever comes first (a hold never outlives its request)."""

    __slots__ = ("_queue",)

    def __init__(self, queue: Places) -> None:
        self._queue: Places | None = queue
        queue.reserved += 1

    def release(self) -> None:
        queue, self._queue = self._queue, None
        if queue is not None:
            queue.reserved -= 1
