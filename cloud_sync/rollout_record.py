"""The last save of each rollout that this controller wrote or accepted, kept on its own machine.

Import path and API::

    from cloud_sync.rollout_record import SaveRecord
    record = SaveRecord.in_dir(None)  # --state-dir, else the default directory (below)
    record.accept(store.url, rollout_id, header.save_seq)  # StoreError if older; advances
    record.advance(store.url, rollout_id, seq)  # after a save's header is written

Every document of a rollout verifies on its own, and the header records which save each wave
is from; so a bucket writer without the signing key can still put back a whole older state,
header and waves, that the key signed, and nothing in the bucket shows that it is older. This
record, outside the bucket, does: per store (its URL, bucket and prefix, so that two fleets do
not mix) and rollout, the save sequence of the last header this controller wrote or accepted. A
fresh load with the key refuses a header older than it and advances it past a newer one (a save
by a controller on another machine). A controller on a machine without the record takes what
the bucket holds at first sight.

The file is ``rollout-saves.json`` in the controller's state directory: ``--state-dir``, else
``$EDGEBENTO_STATE_DIR``, else ``$XDG_STATE_HOME/edgebento``, else ``~/.local/state/edgebento``.
It is the controller's own, trusted like its key; still, one that is not what this module
writes (not JSON, other types, over ``MAX_BYTES``, not a regular file) is refused with its path
and why, never read as "nothing recorded", which would trust the bucket again. A missing file
is first sight. Each change is a read, a write to a temporary file, fsync and a rename, under
an exclusive lock, so that ``rollout status --key`` beside a running controller loses neither's
update and a controller killed mid-write leaves the former file whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cloud_sync.store import write_atomic
from modelpack.errors import ConfigError, StoreError

STATE_DIR_ENV = "EDGEBENTO_STATE_DIR"
FILE_NAME = "rollout-saves.json"
# A record is some 80 bytes a rollout: 16 MiB holds some 200,000 rollouts, and bounds what a
# load reads before it knows the file is one.
MAX_BYTES = 16 << 20
MAX_SEQ = 2**63 - 1

Seq = Annotated[int, Field(ge=0, le=MAX_SEQ)]


class _RecordFile(BaseModel):
    # strict: a sequence is a JSON integer, never "3", 3.0 or true.
    model_config = ConfigDict(extra="forbid", strict=True)
    schema_version: Literal[1] = 1
    stores: dict[str, dict[str, Seq]] = Field(default_factory=dict)  # store URL -> id -> seq


def default_state_dir() -> Path:
    explicit = os.environ.get(STATE_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME")
    if xdg and Path(xdg).is_absolute():  # the XDG spec: a relative one is to be ignored
        return Path(xdg) / "edgebento"
    return Path.home() / ".local" / "state" / "edgebento"


@dataclass(frozen=True)
class SaveRecord:
    path: Path

    @classmethod
    def in_dir(cls, state_dir: Path | None) -> SaveRecord:
        return cls((state_dir or default_state_dir()) / FILE_NAME)

    def recorded(self, store_url: str, rollout_id: str) -> int | None:
        """The last save recorded for the rollout, or None at first sight."""
        return self._read().stores.get(store_url, {}).get(rollout_id)

    def accept(self, store_url: str, rollout_id: str, seq: int) -> None:
        """Take a verified header's save sequence: refused (``StoreError``) when older than the
        recorded one, else recorded."""
        with self._locked():
            doc = self._read()
            recorded = doc.stores.get(store_url, {}).get(rollout_id)
            if recorded is not None and seq < recorded:
                raise StoreError(
                    f"rollout {rollout_id} in {store_url}: its header is from save "
                    f"{seq or 'before sequences'} but this controller last wrote or accepted "
                    f"save {recorded} ({self.path}): an older state put back (replayed or "
                    "stale); refusing to act on it"
                )
            if recorded != seq:
                self._write(doc, store_url, rollout_id, seq)

    def advance(self, store_url: str, rollout_id: str, seq: int) -> None:
        """Record a save this controller wrote (never moving the record back)."""
        with self._locked():
            doc = self._read()
            if seq > doc.stores.get(store_url, {}).get(rollout_id, -1):
                self._write(doc, store_url, rollout_id, seq)

    def _invalid(self, why: str) -> ConfigError:
        return ConfigError(
            f"{self.path} is not a valid record of rollout saves ({why}); refusing to trust the "
            "bucket without it: restore it, or move it away to take what the bucket holds now "
            "(docs/security.md)"
        )

    def _read(self) -> _RecordFile:
        try:
            # O_NONBLOCK: a FIFO put there must not hang the load; the stat refuses it.
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return _RecordFile()
        except OSError as exc:
            raise self._invalid(f"cannot open it: {exc.strerror or exc}") from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise self._invalid("not a regular file")
        with os.fdopen(fd, "rb") as file:
            try:
                data = file.read(MAX_BYTES + 1)
            except OSError as exc:
                raise self._invalid(f"cannot read it: {exc.strerror or exc}") from exc
        if len(data) > MAX_BYTES:
            raise self._invalid(f"over {MAX_BYTES} bytes")
        try:
            raw = json.loads(data)
        # ValueError: not UTF-8 or not JSON, or an integer past Python's digit limit;
        # RecursionError: brackets nested deeper than the parser's stack.
        except (ValueError, RecursionError) as exc:
            raise self._invalid("not JSON") from exc
        try:
            return _RecordFile.model_validate(raw)
        except ValidationError as exc:
            problem = exc.errors()[0]
            where = ".".join(str(part) for part in problem["loc"]) or "the document"
            raise self._invalid(f"{where}: {problem['msg']}") from exc

    def _write(self, doc: _RecordFile, store_url: str, rollout_id: str, seq: int) -> None:
        doc.stores.setdefault(store_url, {})[rollout_id] = seq
        body = json.dumps(doc.model_dump(mode="json"), indent=1, sort_keys=True).encode()
        try:
            write_atomic(self.path, body)  # a temporary file, fsync, rename
        except OSError as exc:
            raise ConfigError(f"cannot write {self.path}: {exc.strerror or exc}") from exc

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive lock on a file beside the record (the record itself is replaced by a
        rename, so a lock on it would not outlive one write)."""
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigError(
                f"cannot keep the record of rollout saves in {self.path.parent}: "
                f"{exc.strerror or exc} (--state-dir, or ${STATE_DIR_ENV})"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
