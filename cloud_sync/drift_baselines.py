"""The baselines ``edgebento monitor`` compares with: from pack directories given, or fetched
from the registry for each (model, version) the summaries name, verified like any install."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from modelpack.baseline import BASELINE_FILE, Baseline, read_baseline
from modelpack.errors import EdgebentoError
from modelpack.loader import load_pack

log = logging.getLogger(__name__)

Baselines = dict[tuple[str, int], tuple[str, Baseline]]


def _from_dir(
    root: Path, trusted: Sequence[Path]
) -> tuple[tuple[str, int], tuple[str, Baseline]] | None:
    # Unsigned packs are read only when no key is given (a local check); with keys, a pack
    # must be signed by one of them, as a device requires.
    pack = load_pack(root, trusted=trusted, allow_unsigned=not trusted, allow_expired=True)
    entry = pack.manifest.file(BASELINE_FILE)
    baseline = read_baseline(pack.root)
    if entry is None or baseline is None:
        return None
    return (pack.manifest.name, pack.manifest.version), (entry.sha256, baseline)


def load_baselines(
    wanted: Iterable[tuple[str, int]],
    packs: Sequence[Path] = (),
    store: Any = None,
    trusted: Sequence[Path] = (),
) -> tuple[Baselines, dict[tuple[str, int], str]]:
    """Baselines by (model, version), and why the others have none."""
    found: Baselines = {}
    missing: dict[tuple[str, int], str] = {}
    for root in packs:
        item = _from_dir(root, trusted)
        if item is not None:
            found[item[0]] = item[1]
    for key in sorted(set(wanted) - set(found)):
        if store is None:
            missing[key] = "no pack given for it"
            continue
        from cloud_sync.registry import Registry

        try:
            with tempfile.TemporaryDirectory(prefix="edgebento-baseline-") as tmp:
                target = Path(tmp) / "pack"
                Registry(store).fetch(key[0], key[1], target)
                item = _from_dir(target, trusted)
        except EdgebentoError as exc:
            missing[key] = str(exc)
            continue
        if item is None:
            missing[key] = f"the pack has no {BASELINE_FILE}"
        else:
            found[key] = item[1]
    return found, missing
