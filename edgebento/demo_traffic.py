"""Live inference traffic for the demo's drift and shadow steps: requests of rows from a data
set to each device in turn, paced, until the step has what it waits for (or a bound)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from edgebento.demo_fleet import reply_topic

Message = tuple[str, dict[str, object]]


def paced_requests(
    data: Path,
    devices: Sequence[str],
    name: str,
    stop: threading.Event,
    *,
    rows: int,
    rate: float,
    seconds: float,
    seed: int,
    transform: Callable[[str, Any], Any] = lambda _device, x: x,
) -> Iterator[Message]:
    """Requests of ``rows`` rows of ``data``'s ``x`` (through ``transform(device, rows)``) to
    each of ``devices`` in turn, ``rate`` a second each, until ``stop`` or ``seconds``. Replies
    go under each device's own replies/``name``."""
    import numpy as np

    x = np.load(data)["x"]
    rng = np.random.default_rng(seed)
    until = time.monotonic() + seconds
    i = 0
    while time.monotonic() < until and not stop.is_set():
        for device in devices:
            batch = transform(device, x[rng.integers(0, len(x), rows)]).round(4).tolist()
            yield f"edgebento/{device}/infer", {
                "id": f"{name}-{i}", "inputs": {"x": batch},
                "reply_to": reply_topic(device, name),
            }  # fmt: skip
        i += 1
        stop.wait(1 / rate)
