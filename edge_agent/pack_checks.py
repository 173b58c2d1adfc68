"""The checks a pack passes before this device serves it or shadows it: its signature and
hashes, its version against the highest installed, and its golden samples on the loaded model.

Import path and API::

    from edge_agent.pack_checks import PackChecks, label
    checks = PackChecks(config, highest=updater.highest)   # highest: the state's mark per name
    pack = checks.verify(root)                       # signature, hashes, expiry
    checks.check_version(pack, "tiny v3", None)      # VersionError at or below the mark
    predictor = checks.load(pack)
    checks.health(pack, predictor)                   # HealthCheckError on wrong answers

Packs are verified with ``load_pack(check_model=False)``: the publisher ran onnx.checker before
signing, and the signature proves it, so a device needs neither the onnx package nor its memory.
The checks record nothing and serve nothing: ``edge_agent.updater`` does that once they pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent.config import AgentConfig
from edge_agent.health import health_check
from modelpack.errors import VersionError
from modelpack.loader import load_pack
from modelpack.pack import Pack
from modelpack.predictor import Predictor, PredictorOptions


def label(pack: Pack | None) -> str:
    return "nothing" if pack is None else f"{pack.manifest.name} v{pack.manifest.version}"


class PackChecks:
    def __init__(self, config: AgentConfig, highest: Callable[[str], int | None]) -> None:
        self.config = config
        self.highest = highest
        self.options = PredictorOptions(intra_op_threads=config.intra_op_threads)

    def verify(self, root: Path, installed: bool = False) -> Pack:
        """``installed``: a pack verified when it was installed, which the clock passing its
        expires_at since must not take dark (unless ``refuse_expired``)."""
        allow_expired = installed and not self.config.refuse_expired
        return load_pack(root, self.config.trust, check_model=False, allow_expired=allow_expired)

    def check_version(self, pack: Pack, source: str, rollback_to: tuple[str, int] | None) -> None:
        """Above the highest version of its name this device installed (TUF's rollback rule),
        or exactly the version a rollback asks for (the caller checked its authority)."""
        m = pack.manifest
        if rollback_to is not None:
            if (m.name, m.version) != rollback_to:
                raise VersionError(
                    f"{source} holds {label(pack)}, not the {rollback_to[0]} "
                    f"v{rollback_to[1]} the rollback asks for"
                )
            return
        mark = self.highest(m.name)
        if mark is not None and m.version <= mark:
            raise VersionError(
                f"{label(pack)} is not above v{mark}, the highest {m.name} this device "
                "installed; a downgrade needs a signed rollback instruction"
            )

    def load(self, pack: Pack) -> Predictor:
        return Predictor.from_pack(pack, self.options)

    def health(self, pack: Pack, predictor: Predictor) -> dict[str, Any]:
        cfg = self.config
        budget = cfg.limits.latency_budget_ms
        return health_check(pack, predictor, budget, cfg.golden_rtol, cfg.golden_atol)

    def staged(self, fetched: Path, name: str, version: int) -> tuple[Pack, Predictor]:
        """``name`` v``version`` as fetched into ``fetched``, checked as an install checks it
        (and that it is the version asked), then loaded where it lies."""
        pack = self.verify(fetched)
        if (pack.manifest.name, pack.manifest.version) != (name, version):
            raise VersionError(f"the store's {name} v{version} holds {label(pack)}")
        self.check_version(pack, f"{name} v{version}", None)
        pack = dataclasses.replace(pack, root=fetched)
        predictor = self.load(pack)
        self.health(pack, predictor)
        return pack, predictor
