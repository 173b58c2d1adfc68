"""The enrollment host's own list of claims that never enroll again, whatever the bucket says.

Import path and API (through ``IdentityStore``, which keeps it beside the broker's CRL)::

    from cloud_sync.spent_claims import SpentClaims, spent_path
    spent = SpentClaims(spent_path(crl_file))      # {crl_file}.spent-claims.json
    with spent.held() as held:                     # one writer across processes
        held.why_not(key_hash, "cam-1")            # "spent" / "revoked" / None
        held.add("cam-1", "spent", [(key_hash, doc.expires_at)])   # (claim, its expiry)
    spent.problem()                                # why it does not read (None: it does)
    spent.rebuild(entries)                         # ``fleet rebuild-spent-claims``'s

A claim's ``used`` lies outside its signature (a spend must not need the CA to sign the claim
again), so a bucket writer can clear it and the token's holder spend it again. And "made before
the revocation" compares the claim host's clock with the revoking host's: a claim made on a
laptop five minutes fast, a minute before the revocation, reads as made after it. This list,
on the host that holds the broker's CRL (where ``enroll-service --crl-file`` and ``fleet
revoke`` run), closes both without the bucket or a clock: a claim spent for a device, and every
claim that names a device when it is revoked, is written here and refused for that device from
then on. An entry leaves once its claim has expired (its signed ``expires_at``: refused anyway
then) by ``PRUNE_MARGIN_S``: this host's clock stepped forward for an hour must not drop live
entries. The file is written whole, fsynced and renamed (``pem_files.write_public``); one that
does not read is a ConfigError: every claim is refused (fail closed), never spent on the
bucket's word, until ``edgebento fleet rebuild-spent-claims`` rebuilds it from the bucket
(``cloud_sync.spent_rebuild``). It is made empty by the first CRL write on a host,
before the CRL's last good copy (``crl_disk.write_crl``: ``--first-crl``, ``fleet
broker-config``, the first write after an upgrade); missing while that copy is there (a host
moved without it, or deleted) is a ConfigError too, never read as an empty list.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cloud_sync.pem_files import write_public
from modelpack.errors import ConfigError

Why = Literal["spent", "revoked"]
MAX_BYTES = 64 << 20  # ~200 bytes an entry: far over any fleet's live claims
PRUNE_MARGIN_S = 7 * 86400  # an entry is kept this long past its claim's expiry
REBUILD = "edgebento fleet rebuild-spent-claims --ca DIR --crl-file CRL --store URL"


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    why: Why
    until: float = Field(allow_inf_nan=False)


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")
    v: Literal[1] = 1
    claims: dict[str, _Entry] = Field(default_factory=dict)  # "{sha256}:{device}"


def spent_path(crl_file: Path) -> Path:
    return crl_file.with_name(f"{crl_file.name}.spent-claims.json")


class Held:
    """The list read under its lock; ``add`` writes it at once."""

    def __init__(self, path: Path, doc: _Doc) -> None:
        self.path, self.doc = path, doc

    def why_not(self, key_hash: str, device: str) -> Why | None:
        entry = self.doc.claims.get(f"{key_hash}:{device}")
        return None if entry is None else entry.why

    def add(self, device: str, why: Why, claims: Iterable[tuple[str, float]]) -> None:
        """The claims (hash, expiry) listed for ``device``; expired entries leave."""
        now = time.time()
        kept = {k: e for k, e in self.doc.claims.items() if e.until + PRUNE_MARGIN_S > now}
        for key_hash, until in claims:
            if f"{key_hash}:{device}" not in kept or why == "revoked":
                kept[f"{key_hash}:{device}"] = _Entry(why=why, until=until)
        self._write(_Doc(claims=kept))

    def remove(self, key_hash: str, device: str) -> None:
        """The claim no longer listed for ``device`` (a spend listed first whose swap lost)."""
        kept = dict(self.doc.claims)
        if kept.pop(f"{key_hash}:{device}", None) is not None:
            self._write(_Doc(claims=kept))

    def _write(self, doc: _Doc) -> None:
        write_public(self.path, doc.model_dump_json().encode())
        self.doc = doc


class SpentClaims:
    def __init__(self, path: Path, made_before: Path | None = None) -> None:
        """``made_before``: the CRL's last good copy, which is never written before the list."""
        self.path, self.made_before = path, made_before
        self._seen: tuple[tuple[int, ...], str | None] | None = None  # problem()'s, by stat

    def problem(self) -> str | None:
        """Why the list does not read (every claim is refused meanwhile); None when it does.
        Read again only when the file's stat changed (the metrics gauge asks at each scrape,
        and parsing 100k entries took 0.37 s of CPU), as ``BrokerCrl`` does."""
        try:
            st = self.path.stat()
            seen: tuple[int, ...] | None = (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)
        except OSError:
            seen = None  # missing (or not statable): nothing to parse, asked each time
        if seen is not None and self._seen is not None and self._seen[0] == seen:
            return self._seen[1]
        found = None
        try:
            self._read()
        except ConfigError as exc:
            found = str(exc)
        self._seen = None if seen is None else (seen, found)
        return found

    def rebuild(self, entries: dict[str, tuple[Why, float]]) -> Path | None:
        """The list made of ``entries`` ({"{sha256}:{device}": (why, claim expiry)}), under
        the lock, joined with what the list holds when it reads (``revoked`` over ``spent``);
        one that does not read is kept beside it as ``.damaged`` (returned) and replaced."""
        with self.held_raw() as read:
            kept: dict[str, _Entry] = {}
            damaged = None
            try:
                kept = dict(read().claims)
            except ConfigError:
                if self.path.exists():
                    damaged = self.path.with_name(f"{self.path.name}.damaged")
                    self.path.replace(damaged)
            for key, (why, until) in entries.items():
                if key not in kept or why == "revoked":
                    kept[key] = _Entry(why=why, until=until)
            write_public(self.path, _Doc(claims=kept).model_dump_json().encode())
            return damaged

    def create(self) -> None:
        """An empty list where there is none (with the broker's first CRL)."""
        if not self.path.exists():
            write_public(self.path, _Doc().model_dump_json().encode())

    @contextlib.contextmanager
    def held(self) -> Iterator[Held]:
        """The list, read and held against every other writer (the enrollment service's spends,
        ``fleet revoke``) until the block ends."""
        with self.held_raw() as read:
            yield Held(self.path, read())

    @contextlib.contextmanager
    def held_raw(self) -> Iterator[Callable[[], _Doc]]:
        """The lock, and the list's reader (which raises ConfigError where it does not read)."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.with_name(f".{self.path.name}.lock").open("ab") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
            yield self._read

    def _read(self) -> _Doc:
        try:
            with self.path.open("rb") as fh:
                data = fh.read(MAX_BYTES + 1)
        except FileNotFoundError:
            if self.made_before is not None and self.made_before.exists():
                raise ConfigError(
                    f"{self.path} is missing while {self.made_before.name} is there: move it "
                    f"with the CRL to a new host; if it is lost, rebuild it from the bucket: "
                    f"`{REBUILD}`"
                ) from None
            return _Doc()
        except OSError as exc:
            raise ConfigError(f"{self.path}: the spent claims cannot be read: {exc}") from exc
        if len(data) > MAX_BYTES:
            raise ConfigError(
                f"{self.path}: the spent claims are over {MAX_BYTES} bytes: every claim is "
                f"refused until it is rebuilt from the bucket: `{REBUILD}`"
            )
        try:
            return _Doc.model_validate_json(data)
        except ValidationError as exc:
            raise ConfigError(
                f"{self.path} is not a list of spent claims: every claim is refused until it "
                f"is rebuilt from the bucket: `{REBUILD}` (removing it does not help)"
            ) from exc
