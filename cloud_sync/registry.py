"""The model registry: signed ModelPacks on an object store, by name, version and channel.

Import path and API::

    from cloud_sync.registry import Registry, PackEntry
    from cloud_sync.store import open_store

    registry = Registry(open_store("s3://bucket/prefix"))
    registry.publish(pack_dir: Path, *, key: Path | None = None, trusted: Sequence[Path] = (),
                     channel: str | None = "stable", force: bool = False) -> PackEntry
    registry.fetch(name: str, version: int, target_dir: Path) -> Path
        # downloads the archive, checks its sha256 against the index and unpacks it safely
        # (modelpack.extract_archive) into target_dir, which must not exist yet. NOT verified:
        # the caller runs modelpack.load_pack(target_dir, trusted=...) with its own keys.
    registry.latest(name: str, channel: str = "stable") -> int | None
    registry.entry(name, version) -> PackEntry          # NotFoundError when not published
    registry.entries() -> list[PackEntry]; registry.versions(name) -> list[int]
    registry.channels(name) -> dict[str, int]; registry.set_channel(name, channel, version)
    registry.pack_url(name, version, expires_s=3600) -> str   # presigned GET of the archive

Key layout (a version is published once its ``index.json`` exists; it is written after every
other object of the version, and the channel pointer after it, so a reader never sees a
half-published version)::

    packs/{name}/{version}/pack.tar.gz      the pack directory as a .tar.gz
    packs/{name}/{version}/manifest.json    the exact signed manifest bytes, for cheap listing
    packs/{name}/{version}/manifest.sig
    packs/{name}/{version}/index.json       PackEntry: hashes, sizes, fidelity (written last)
    channels/{name}/{channel}.json          {"name", "channel", "version", "updated_at"}
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from cloud_sync.report_gate import BudgetVerdict, read_verdict
from cloud_sync.store import ObjectStore
from modelpack import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    Manifest,
    Pack,
    extract_archive,
    load_pack,
    sha256_bytes,
    sha256_file,
    sign_pack,
    write_archive,
)
from modelpack.errors import (
    ConfigError,
    IntegrityError,
    NotFoundError,
    PackError,
    SignatureError,
    StoreError,
    VersionError,
)
from modelpack.signing import TrustedKey, key_id, load_private_key

ARCHIVE = "pack.tar.gz"
INDEX = "index.json"
_CHANNEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class PackEntry(BaseModel):
    """What the registry knows about one published version (``index.json``)."""

    model_config = ConfigDict(extra="allow")
    schema_version: int = 1
    name: str
    version: int
    manifest_sha256: str
    archive_sha256: str
    archive_size: int
    created_at: str
    published_at: float
    signed_by: str | None = None
    fidelity: str | None = None
    within_budget: bool | None = None


class ChannelPointer(BaseModel):
    model_config = ConfigDict(extra="allow")
    schema_version: int = 1
    name: str
    channel: str
    version: int
    updated_at: float


def version_prefix(name: str, version: int) -> str:
    return f"packs/{name}/{version}/"


def channel_key(name: str, channel: str) -> str:
    return f"channels/{name}/{channel}.json"


def check_channel(channel: str) -> str:
    if not _CHANNEL.match(channel):
        raise ConfigError(f"channel {channel!r} must be 1-64 of A-Z a-z 0-9 . _ -")
    return channel


def _public_of(key: Path) -> TrustedKey:
    public = load_private_key(key).public_key()
    return TrustedKey(key=public, key_id=key_id(public), source=f"public half of {key}")


class Registry:
    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    # --- publishing --------------------------------------------------------------------------

    def publish(
        self,
        pack_dir: Path,
        *,
        key: Path | None = None,
        trusted: Sequence[Path | TrustedKey] = (),
        channel: str | None = "stable",
        force: bool = False,
    ) -> PackEntry:
        """Verify (and sign, if unsigned) a pack, upload it, then move the channel pointer.

        Refuses a version that exists with other bytes (VersionError), a pack whose report says
        it failed its accuracy budget unless ``force`` (PackError), and an unsigned pack
        without ``key`` (SignatureError). Publishing the same bytes again is a no-op upload.
        """
        if channel is not None:
            check_channel(channel)
        with tempfile.TemporaryDirectory(prefix="edgebento-publish-") as tmp:
            # Work on a copy: signing must not touch the user's directory behind their back.
            staged = Path(tmp) / "pack"
            try:
                shutil.copytree(pack_dir, staged, symlinks=True)
            except OSError as exc:
                raise PackError(f"cannot read pack directory {pack_dir}: {exc}") from exc
            pack = self._verified(staged, key, trusted)
            verdict = read_verdict(staged)
            if verdict.within_budget is False and not force:
                raise PackError(
                    f"{pack.manifest.name} v{pack.manifest.version} failed its accuracy budget "
                    f"({verdict.detail}); publish with --force to ship it anyway"
                )
            entry = self._upload(staged, pack.manifest, pack.signed_by, verdict)
        if channel is not None:
            self.set_channel(entry.name, channel, entry.version)
        return entry

    def _verified(
        self, staged: Path, key: Path | None, trusted: Sequence[Path | TrustedKey]
    ) -> Pack:
        keys: list[Path | TrustedKey] = [*trusted]
        if key is not None:
            keys.append(_public_of(key))
        if not (staged / SIGNATURE_FILE).exists():
            if key is None:
                raise SignatureError(
                    f"{staged.name} is not signed and no signing key was given (--key)"
                )
            sign_pack(staged, key)  # checks every file against the manifest first
        if not keys:
            raise SignatureError("no key to verify the pack's signature with (--key or --trust)")
        return load_pack(staged, trusted=keys)

    def _upload(
        self, staged: Path, manifest: Manifest, signed_by: str | None, verdict: BudgetVerdict
    ) -> PackEntry:
        prefix = version_prefix(manifest.name, manifest.version)
        manifest_bytes = (staged / MANIFEST_FILE).read_bytes()
        manifest_sha = sha256_bytes(manifest_bytes)
        existing = self._entry_or_none(manifest.name, manifest.version)
        if existing is not None:
            if existing.manifest_sha256 != manifest_sha:
                raise VersionError(
                    f"{manifest.name} v{manifest.version} is already published with other "
                    "contents; publish a new version number"
                )
            return existing
        archive = write_archive(staged, staged.parent / ARCHIVE)
        entry = PackEntry(
            name=manifest.name,
            version=manifest.version,
            manifest_sha256=manifest_sha,
            archive_sha256=sha256_file(archive),
            archive_size=archive.stat().st_size,
            created_at=manifest.created_at.isoformat(),
            published_at=time.time(),
            signed_by=signed_by,
            fidelity=verdict.fidelity,
            within_budget=verdict.within_budget,
        )
        self.store.put_file(prefix + ARCHIVE, archive)
        self.store.put_bytes(prefix + MANIFEST_FILE, manifest_bytes)
        self.store.put_bytes(prefix + SIGNATURE_FILE, (staged / SIGNATURE_FILE).read_bytes())
        self.store.put_bytes(prefix + INDEX, entry.model_dump_json(indent=2).encode())
        return entry

    def set_channel(self, name: str, channel: str, version: int) -> None:
        check_channel(channel)
        self.entry(name, version)  # a pointer never points at a version that is not there
        pointer = ChannelPointer(
            name=name, channel=channel, version=version, updated_at=time.time()
        )
        self.store.put_bytes(channel_key(name, channel), pointer.model_dump_json().encode())

    # --- reading -----------------------------------------------------------------------------

    def _entry_or_none(self, name: str, version: int) -> PackEntry | None:
        try:
            return self.entry(name, version)
        except NotFoundError:
            return None

    def entry(self, name: str, version: int) -> PackEntry:
        key = version_prefix(name, version) + INDEX
        try:
            data = self.store.get_bytes(key)
        except NotFoundError as exc:
            raise NotFoundError(f"{name} v{version} is not published in {self.store.url}") from exc
        try:
            return PackEntry.model_validate_json(data)
        except ValidationError as exc:
            raise StoreError(f"{key} in {self.store.url} is not a valid registry entry") from exc

    def manifest(self, name: str, version: int) -> Manifest:
        self.entry(name, version)
        return Manifest.from_bytes(
            self.store.get_bytes(version_prefix(name, version) + MANIFEST_FILE)
        )

    def names(self) -> list[str]:
        return sorted({k.split("/")[1] for k in self.store.list("packs/") if k.endswith(INDEX)})

    def versions(self, name: str) -> list[int]:
        found = []
        for key in self.store.list(f"packs/{name}/"):
            parts = key.split("/")
            if len(parts) == 4 and parts[3] == INDEX and parts[2].isdigit():
                found.append(int(parts[2]))
        return sorted(found)

    def entries(self) -> list[PackEntry]:
        return [self.entry(n, v) for n in self.names() for v in self.versions(n)]

    def channels(self, name: str) -> dict[str, int]:
        pointers = {}
        for key in self.store.list(f"channels/{name}/"):
            channel = key.rsplit("/", 1)[-1].removesuffix(".json")
            version = self.latest(name, channel)
            if version is not None:
                pointers[channel] = version
        return pointers

    def latest(self, name: str, channel: str = "stable") -> int | None:
        try:
            data = self.store.get_bytes(channel_key(name, check_channel(channel)))
        except NotFoundError:
            return None
        try:
            return ChannelPointer.model_validate_json(data).version
        except ValidationError as exc:
            raise StoreError(f"channel pointer {name}/{channel} is not valid JSON") from exc

    def pack_url(self, name: str, version: int, expires_s: int = 3600) -> str:
        self.entry(name, version)
        return self.store.presign(version_prefix(name, version) + ARCHIVE, expires_s)

    def fetch(self, name: str, version: int, target_dir: Path) -> Path:
        """Download and unpack a published pack into ``target_dir`` (not yet verified)."""
        entry = self.entry(name, version)
        target_dir = Path(target_dir)
        target_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target_dir.parent) as tmp:
            archive = self.store.get_file(
                version_prefix(name, version) + ARCHIVE, Path(tmp) / ARCHIVE
            )
            if sha256_file(archive) != entry.archive_sha256:
                raise IntegrityError(
                    f"the archive of {name} v{version} does not match its sha256 in the registry"
                )
            return extract_archive(archive, target_dir)
