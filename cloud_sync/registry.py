"""The model registry: signed ModelPacks on an object store, by name, version and channel.

Import path and API::

    from cloud_sync.registry import Registry, PackEntry
    from cloud_sync.store import open_store

    registry = Registry(open_store("s3://bucket/prefix"))
    registry.publish(pack_dir: Path, *, key: Path | None = None, trusted: Sequence[Path] = (),
                     channel: str | None = "stable", force: bool = False,
                     allow_backwards: bool = False) -> PackEntry
    registry.fetch(name: str, version: int, target_dir: Path) -> Path
        # downloads at most the indexed archive_size bytes, checks the archive's sha256 and the
        # manifest inside it against the index, and unpacks it safely into target_dir (which
        # must not exist yet). NOT signature-verified: the caller runs
        # modelpack.load_pack(target_dir, trusted=...) with its own keys.
    registry.latest(name: str, channel: str = "stable") -> int | None
    registry.entry(name, version) -> PackEntry   # NotFoundError; IntegrityError if forged
    registry.scan() -> (entries, strays); registry.entries(); registry.versions(name)
    registry.channels(name) -> dict[str, int]
    registry.set_channel(name, channel, version, *, allow_backwards=False)
    registry.pack_url(name, version, expires_s=3600) -> str   # presigned GET of the archive

Key layout. A version is published once its ``index.json`` exists: it is created last, with a
create-only write (S3 ``If-None-Match: *``), so of two publishers of one version exactly one
wins, and a reader never sees a half-published version. Each publisher uploads its objects
under the sha256 of its own archive, so the loser cannot overwrite the winner's bytes::

    packs/{name}/{version}/{archive_sha256}/pack.tar.gz     the pack directory as a .tar.gz
    packs/{name}/{version}/{archive_sha256}/manifest.json   the exact signed manifest bytes
    packs/{name}/{version}/{archive_sha256}/manifest.sig
    packs/{name}/{version}/index.json       PackEntry: hashes, sizes, fidelity (created last)
    channels/{name}/{channel}.json          {"name", "channel", "version", "updated_at"}

What a reader trusts: the identity of a version is its signed manifest, not its key. Every read
(``entry``, ``fetch``, ``entries``) checks that the index and the manifest name the key's name and
version and that the manifest's sha256 is the one the index records; ``fetch`` reads at most the
index's ``archive_size`` bytes and checks the archive's sha256 and the manifest inside it. A key
that is not a published version (``packs/det/007/index.json``) is reported and skipped.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from cloud_sync.registry_index import (
    ARCHIVE,
    CHANNEL_NAME,
    INDEX,
    ChannelPointer,
    PackEntry,
    Stray,
    channel_key,
    check_channel,
    check_name,
    index_key,
    version_prefix,
)
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
    ArchiveError,
    ConflictError,
    IntegrityError,
    ManifestError,
    NotFoundError,
    PackError,
    SignatureError,
    StoreError,
    VersionError,
)
from modelpack.signing import TrustedKey, key_id, load_private_key

_CHANNEL_RETRIES = 5


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
        allow_backwards: bool = False,
    ) -> PackEntry:
        """Verify (and sign, if unsigned) a pack, upload it, then move the channel pointer.

        Refuses a version that exists with other bytes, or that another publisher created at
        the same moment (VersionError); a channel that would move to a lower version unless
        ``allow_backwards`` (VersionError, before anything is uploaded); a pack whose report
        says it failed its accuracy budget unless ``force`` (PackError); and an unsigned pack
        without ``key`` (SignatureError). Publishing the same bytes again is a no-op.
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
            if channel is not None and not allow_backwards:
                self._check_forward(pack.manifest.name, channel, pack.manifest.version)
            entry = self._upload(staged, pack.manifest, pack.signed_by, verdict)
        if channel is not None:
            self.set_channel(entry.name, channel, entry.version, allow_backwards=allow_backwards)
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

    def _same_or_refuse(self, existing: PackEntry, manifest_sha: str, how: str) -> PackEntry:
        if existing.manifest_sha256 != manifest_sha:
            raise VersionError(
                f"{existing.name} v{existing.version} is {how} with other contents; "
                "publish a new version number"
            )
        return existing

    def _upload(
        self, staged: Path, manifest: Manifest, signed_by: str | None, verdict: BudgetVerdict
    ) -> PackEntry:
        manifest_bytes = (staged / MANIFEST_FILE).read_bytes()
        manifest_sha = sha256_bytes(manifest_bytes)
        existing = self._entry_or_none(manifest.name, manifest.version)
        if existing is not None:
            return self._same_or_refuse(existing, manifest_sha, "already published")
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
        objects = entry.objects
        self.store.put_file(objects + ARCHIVE, archive)
        self.store.put_bytes(objects + MANIFEST_FILE, manifest_bytes)
        self.store.put_bytes(objects + SIGNATURE_FILE, (staged / SIGNATURE_FILE).read_bytes())
        index = version_prefix(manifest.name, manifest.version) + INDEX
        try:
            self.store.create(index, entry.model_dump_json(indent=2).encode())
        except ConflictError:
            # Another publisher created this version between our check and our write.
            for name in (ARCHIVE, MANIFEST_FILE, SIGNATURE_FILE):
                self.store.delete(objects + name)  # ours alone: the path is our archive's sha
            winner = self.entry(manifest.name, manifest.version)
            return self._same_or_refuse(winner, manifest_sha, "being published concurrently")
        return entry

    def _check_forward(self, name: str, channel: str, version: int) -> None:
        try:
            data = self.store.get_bytes(channel_key(name, channel))
        except NotFoundError:
            return
        current = self._current(data, name, channel)
        if current is not None and current > version:
            raise VersionError(
                f"channel {channel} of {name} is at v{current}; moving it back to v{version} "
                "needs --allow-backwards (or publish with --no-channel)"
            )

    def set_channel(
        self, name: str, channel: str, version: int, *, allow_backwards: bool = False
    ) -> None:
        """Point ``channel`` at a published version, with a compare-and-swap on the pointer, so
        two writers cannot both believe they moved it; lower versions need ``allow_backwards``."""
        check_channel(channel)
        self.entry(name, version)  # a pointer never points at a version that is not there
        key = channel_key(name, channel)
        pointer = ChannelPointer(name=name, channel=channel, version=version, updated_at=0.0)
        for _attempt in range(_CHANNEL_RETRIES):
            pointer.updated_at = time.time()
            body = pointer.model_dump_json().encode()
            try:
                data, etag = self.store.read(key)
            except NotFoundError:
                try:
                    self.store.create(key, body)
                    return
                except ConflictError:
                    continue
            current = self._current(data, name, channel)
            if current is not None and current > version and not allow_backwards:
                self._check_forward(name, channel, version)
            try:
                self.store.replace(key, body, etag)
                return
            except ConflictError:
                continue
        raise StoreError(f"channel {channel} of {name} kept changing under us; try again")

    # --- reading -----------------------------------------------------------------------------

    def _entry_or_none(self, name: str, version: int) -> PackEntry | None:
        try:
            return self.entry(name, version)
        except NotFoundError:
            return None

    def entry(self, name: str, version: int) -> PackEntry:
        """The index of ``name`` v``version``, once it and the signed manifest agree on who it is.

        NotFoundError when not published; IntegrityError when the index or the manifest names
        another pack or version, or the manifest is not the one the index records.
        """
        key = version_prefix(name, version) + INDEX
        try:
            data = self.store.get_bytes(key)
        except NotFoundError as exc:
            raise NotFoundError(f"{name} v{version} is not published in {self.store.url}") from exc
        try:
            entry = PackEntry.model_validate_json(data)
        except ValidationError as exc:
            raise StoreError(f"{key} in {self.store.url} is not a valid registry entry") from exc
        if (entry.name, entry.version) != (name, version):
            raise IntegrityError(
                f"{key} describes {entry.name} v{entry.version}, not {name} v{version}"
            )
        self._checked_manifest(entry)
        return entry

    def _checked_manifest(self, entry: PackEntry) -> Manifest:
        where = f"{entry.name} v{entry.version}"
        try:
            data = self.store.get_bytes(entry.objects + MANIFEST_FILE)
        except NotFoundError as exc:
            raise IntegrityError(f"the manifest of {where} is missing") from exc
        return self._manifest_of(entry, data, where)

    def _manifest_of(self, entry: PackEntry, data: bytes, where: str) -> Manifest:
        if sha256_bytes(data) != entry.manifest_sha256:
            raise IntegrityError(f"the manifest of {where} is not the one its index records")
        try:
            manifest = Manifest.from_bytes(data)
        except ManifestError as exc:
            raise IntegrityError(f"the manifest of {where} is not valid: {exc}") from exc
        if (manifest.name, manifest.version) != (entry.name, entry.version):
            raise IntegrityError(
                f"the signed manifest under {where} is {manifest.name} v{manifest.version}"
            )
        return manifest

    def manifest(self, name: str, version: int) -> Manifest:
        return self._checked_manifest(self.entry(name, version))

    def scan(self) -> tuple[list[PackEntry], list[Stray]]:
        """Every published version that checks out, and every index key that does not."""
        entries: list[PackEntry] = []
        strays: list[Stray] = []
        for key in self.store.list("packs/"):
            if not key.endswith("/" + INDEX):
                continue
            found = index_key(key)
            if found is None:
                strays.append(Stray(key, "not packs/NAME/VERSION/index.json"))
                continue
            try:
                entries.append(self.entry(*found))
            except StoreError as exc:
                strays.append(Stray(key, str(exc)))
            except PackError as exc:
                strays.append(Stray(key, str(exc)))
        entries.sort(key=lambda e: (e.name, e.version))
        return entries, strays

    def entries(self) -> list[PackEntry]:
        return self.scan()[0]

    def names(self) -> list[str]:
        return sorted({e.name for e in self.entries()})

    def versions(self, name: str) -> list[int]:
        check_name(name)
        found = (index_key(k) for k in self.store.list(f"packs/{name}/"))
        return sorted(f[1] for f in found if f is not None and f[0] == name)

    def channels(self, name: str) -> dict[str, int]:
        pointers = {}
        for key in self.store.list(f"channels/{check_name(name)}/"):
            channel = key.rsplit("/", 1)[-1].removesuffix(".json")
            if not CHANNEL_NAME.fullmatch(channel):
                continue
            try:
                version = self.latest(name, channel)
            except (StoreError, PackError):
                continue  # a broken pointer is no channel; one bad key must not hide the rest
            if version is not None:
                pointers[channel] = version
        return pointers

    def _pointer(self, data: bytes, name: str, channel: str) -> ChannelPointer:
        try:
            pointer = ChannelPointer.model_validate_json(data)
        except ValidationError as exc:
            raise StoreError(f"channel pointer {name}/{channel} is not valid JSON") from exc
        if (pointer.name, pointer.channel) != (name, channel):
            raise IntegrityError(
                f"channel pointer {name}/{channel} names {pointer.name}/{pointer.channel}"
            )
        return pointer

    def latest(self, name: str, channel: str = "stable") -> int | None:
        """The version ``channel`` points at: None when unset; IntegrityError when the pointer
        (which is not signed) names a version that is not published or does not check out."""
        try:
            data = self.store.get_bytes(channel_key(name, check_channel(channel)))
        except NotFoundError:
            return None
        version = self._pointer(data, name, channel).version
        try:
            self.entry(name, version)
        except NotFoundError as exc:
            raise IntegrityError(
                f"channel {channel} of {name} points at v{version}, which is not published"
            ) from exc
        return version

    def _current(self, data: bytes, name: str, channel: str) -> int | None:
        """The pointer's version, or None when it is broken, so a publish can repair it."""
        try:
            version = self._pointer(data, name, channel).version
            self.entry(name, version)
        except (StoreError, PackError):
            return None
        return version

    def pack_url(self, name: str, version: int, expires_s: int = 3600) -> str:
        entry = self.entry(name, version)
        return self.store.presign(entry.objects + ARCHIVE, expires_s)

    def fetch(self, name: str, version: int, target_dir: Path) -> Path:
        """Download and unpack a published pack into ``target_dir`` (signature not yet checked).

        At most the index's ``archive_size`` bytes are read; then the archive's sha256 and the
        manifest inside it are checked against the index before ``target_dir`` appears.
        """
        entry = self.entry(name, version)
        target_dir = Path(target_dir)
        if target_dir.exists():
            raise ArchiveError(f"{target_dir} exists already")
        target_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target_dir.parent) as tmp:
            archive = self.store.get_file(
                entry.objects + ARCHIVE, Path(tmp) / ARCHIVE, max_bytes=entry.archive_size
            )
            if sha256_file(archive) != entry.archive_sha256:
                raise IntegrityError(
                    f"the archive of {name} v{version} does not match its sha256 in the registry"
                )
            unpacked = extract_archive(archive, Path(tmp) / "pack")
            inner = unpacked / MANIFEST_FILE
            packed = inner.read_bytes() if inner.is_file() else b""
            self._manifest_of(entry, packed, f"{name} v{version}")  # the archive's own manifest
            unpacked.rename(target_dir)
        return target_dir
