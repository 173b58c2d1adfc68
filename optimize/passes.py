"""The pass runner: a pass is a config plus a pure transform, and its result is cached by hash.

As in Olive, every transform takes a model file and writes a new one; the runner keys the
result by the sha256 of (pass name, config, input model, any data it saw), so a second run with
the same inputs reuses it, and it records a footprint of every step: what ran, with what, on
which model, how long it took, and why it failed if it did.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict

from modelpack import sha256_file

log = logging.getLogger(__name__)


class PassConfig(BaseModel):
    """Base of every pass's settings: frozen, and nothing unknown accepted."""

    model_config = ConfigDict(frozen=True, extra="forbid")


C = TypeVar("C", bound=PassConfig)
Transform = Callable[[Path, Path, C], None]


@dataclass(frozen=True)
class Step:
    """One line of the footprint."""

    name: str
    config: dict[str, Any]
    source: str  # sha256 of the input model
    output: str | None  # sha256 of the result; None when the pass failed
    seconds: float
    cached: bool
    error: str | None = None


class PassFailed(Exception):
    """A pass raised; the search records the reason and goes on."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.reason = reason


@dataclass
class Runner:
    cache: Path
    footprint: list[Step] = field(default_factory=list)

    def run(
        self, name: str, transform: Transform[C], model: Path, config: C, data_key: str = ""
    ) -> Path:
        """Apply ``transform`` to ``model``, or reuse the result a run with the same key made."""
        self.cache.mkdir(parents=True, exist_ok=True)
        source = sha256_file(model)
        settings = config.model_dump(mode="json")
        key = hashlib.sha256(
            f"{name}\n{config.model_dump_json()}\n{source}\n{data_key}".encode()
        ).hexdigest()[:20]
        out = self.cache / f"{name}-{key}.onnx"
        start = time.perf_counter()
        if out.exists():
            self.footprint.append(Step(name, settings, source, sha256_file(out), 0.0, True))
            return out
        tmp = out.with_name(f".{out.name}.tmp")
        try:
            transform(model, tmp, config)
        except Exception as exc:  # any library error fails this pass, not the search
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            log.debug("pass %s failed", name, exc_info=True)
            self.footprint.append(
                Step(name, settings, source, None, time.perf_counter() - start, False, reason)
            )
            tmp.unlink(missing_ok=True)
            raise PassFailed(name, reason) from exc
        tmp.replace(out)
        self.footprint.append(
            Step(name, settings, source, sha256_file(out), time.perf_counter() - start, False)
        )
        return out

    def records(self) -> list[dict[str, Any]]:
        return [asdict(s) for s in self.footprint]
