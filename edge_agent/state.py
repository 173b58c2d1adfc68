"""``state.json``: what the device serves, its earlier good packs, and the high-water marks.

Replaced atomically (write, fsync, rename, fsync the directory). The marks are the highest
version ever installed per model name (TUF's rollback rule); a file written before they were
kept gets them from the pack directory names (``{name}-v{version}-{sha12}``). Beside them: the
highest rollback-instruction generation applied (an instruction works once) and the generation
of the last desired state acted on (a retained one is re-applied at boot only if newer).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path

from modelpack import untrusted_json

log = logging.getLogger(__name__)

_DIRNAME = re.compile(r"^(?P<name>.+)-v(?P<version>\d+)-[0-9a-f]{12}$")


@dataclasses.dataclass(frozen=True)
class InstallState:
    current: str | None = None
    history: tuple[str, ...] = ()  # earlier good packs, newest first: where rollback goes
    highest: tuple[tuple[str, int], ...] = ()  # per model name, the highest version installed
    rollback_generation: int = 0  # the highest generation of a rollback instruction applied
    desired_generation: int = 0  # the generation of the last desired state acted on

    def mark(self, name: str) -> int | None:
        return dict(self.highest).get(name)

    def raised(self, name: str, version: int) -> tuple[tuple[str, int], ...]:
        marks = dict(self.highest)
        marks[name] = max(version, marks.get(name, version))
        return tuple(sorted(marks.items()))


def marks_from_dirs(dirs: list[str]) -> dict[str, int]:
    """High-water marks from pack dir names (a state.json written before marks were kept)."""
    marks: dict[str, int] = {}
    for d in dirs:
        m = _DIRNAME.match(d)
        if m:
            marks[m["name"]] = max(int(m["version"]), marks.get(m["name"], 0))
    return marks


def read_state(path: Path, packs_dir: Path) -> InstallState:
    try:
        # finite: int() of 1e999 raised OverflowError, past this except, and the agent stopped.
        raw = untrusted_json.loads(path.read_bytes(), "state.json", finite=True)
        history = tuple(d for d in raw.get("history", ()) if isinstance(d, str))
        current = raw.get("current") if isinstance(raw.get("current"), str) else None
        marks = raw.get("highest")
        if not isinstance(marks, dict):
            marks = marks_from_dirs([d for d in (current, *history) if d])
        highest = tuple(sorted((str(k), int(v)) for k, v in marks.items()))
        generations = (
            _count(raw.get("rollback_generation")),
            _count(raw.get("desired_generation")),
        )
        return InstallState(current, history, highest, *generations)
    except FileNotFoundError:
        return InstallState()
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        log.error("state.json is unreadable (%s); starting from the packs on disk", exc)
        dirs = [p.name for p in packs_dir.glob("*")] if packs_dir.exists() else []
        return InstallState(highest=tuple(sorted(marks_from_dirs(dirs).items())))


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def write_state(path: Path, state: InstallState) -> None:
    tmp = path.with_name(".state.json.tmp")
    body = {
        "schema_version": 1,
        "current": state.current,
        "history": list(state.history),
        "highest": dict(state.highest),
        "rollback_generation": state.rollback_generation,
        "desired_generation": state.desired_generation,
    }
    with tmp.open("w") as fh:
        json.dump(body, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under root, so a rename cannot expose half a pack."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
