"""The caps and the overload settings of one served model, the same in every target."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

from modelpack.errors import ConfigError

MAX_BODY_BYTES = 64 << 20


@dataclass(frozen=True)
class ServingLimits:
    """What one request may cost, and how long it may wait.

    ``max_json_numbers`` bounds a JSON body before it is parsed into Python objects (about
    40 bytes of Python per number): large tensors go in b64 or the binary extension, which are
    checked against ``max_elements`` and copied once.
    """

    max_body_bytes: int = MAX_BODY_BYTES
    max_json_numbers: int = 1 << 20
    max_elements: int = 1 << 26  # per input, across its dims (checked before allocation)
    max_input_bytes: int = 256 << 20  # all inputs of one request
    max_rows: int = 4096  # rows of one request
    max_batch_rows: int = 64  # rows of one batch run
    max_queue: int = 256  # requests waiting for the model (per process)
    # The queue is also full when the work in it would take longer than this to start: under a
    # flood the model stays busy with a short queue, and nothing waits near its deadline.
    max_queue_wait_s: float = 1.0
    deadline_s: float = 2.0  # the longest a request may wait to start; a client may shorten it
    retry_after_s: int = 1
    # The time a client has to send its whole body, from its first byte: past it, 408 (the
    # client's fault, counted as rejected with reason timeout), never a run timeout.
    body_timeout_s: float = 10.0
    cache_bytes: int = 0  # the result cache; 0: off

    def deadline(self, requested_s: float | None) -> float:
        """The request's wait budget: the client's, when it is shorter than ours."""
        if requested_s is None or requested_s <= 0:
            return self.deadline_s
        return min(requested_s, self.deadline_s)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: object
    ) -> ServingLimits:
        """``EDGEBENTO_MAX_BODY_BYTES``, ``EDGEBENTO_MAX_QUEUE``, ``EDGEBENTO_DEADLINE_S``, ...:
        each field, upper-cased with the ``EDGEBENTO_`` prefix."""
        env = os.environ if environ is None else environ
        limits = replace(cls(), **overrides)  # type: ignore[arg-type]
        changes: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(f"EDGEBENTO_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            kind = float if f.type in ("float", float) else int
            try:
                value = kind(raw)
            except ValueError as exc:
                raise ConfigError(f"EDGEBENTO_{f.name.upper()}={raw!r} is not a number") from exc
            if value < 0:
                raise ConfigError(f"EDGEBENTO_{f.name.upper()}={raw!r} must not be negative")
            changes[f.name] = value
        return replace(limits, **changes)  # type: ignore[arg-type]
