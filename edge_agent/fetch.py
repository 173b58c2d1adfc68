"""Getting a pack onto the disk, from wherever the deploy command says it lives; bounded.

Every download is capped by the size it is expected to have (the registry's index) or by
``max_bytes``, checked while it streams, and by the job's overall deadline and cancel token,
checked between reads (each read also times out), so a server that trickles a byte at a time
holds the update worker no longer than the deadline. ``s3://`` objects are read through a
presigned URL with the same downloader. ``file://`` and plain paths are allowed only under the
configured roots. Nothing here trusts what it fetched: the updater verifies the result.

What an archive unpacks to is capped too, before any signature is checked: at ``max_bytes``
(the device's ``max_download_bytes``), so a small archive that inflates to gigabytes fills no
disk. A pack is taken to be at most that large, packed or unpacked (ONNX weights barely
compress).
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from cloud_sync.redact import redact_url
from edge_agent.updates import CancelToken
from modelpack.archive import ARCHIVE_SUFFIX, extract_archive
from modelpack.errors import (
    ArchiveError,
    IntegrityError,
    NotFoundError,
    SizeLimitError,
    StoreError,
)
from modelpack.loader import DEFAULT_LIMITS, Limits

_CHUNK = 1 << 16
READ_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class FetchPolicy:
    roots: tuple[Path, ...] = ()  # where file:// and plain paths may point
    max_bytes: int = 1 << 30
    token: CancelToken | None = None

    def allows(self, path: Path) -> bool:
        real = path.resolve()
        return any(real.is_relative_to(root.resolve()) for root in self.roots)

    @property
    def unpack_limits(self) -> Limits:
        cap = min(DEFAULT_LIMITS.max_pack_bytes, self.max_bytes)
        return dataclasses.replace(DEFAULT_LIMITS, max_pack_bytes=cap)


def fetch_url(url: str, target: Path, policy: FetchPolicy) -> Path:
    """A directory, ``file://`` (dir or .tar.gz), ``http(s)://`` or ``s3://`` into ``target``."""
    parts = urlsplit(url)
    if parts.scheme in ("", "file"):
        path = Path(unquote(parts.path) if parts.scheme else url)
        if not policy.allows(path):
            raise StoreError(
                f"{redact_url(url)} is outside the directories this device may install from "
                "(file_roots)"
            )
        return _fetch_local(path, target, policy.unpack_limits)
    if parts.scheme in ("http", "https"):
        return _unpack_download(target, lambda dst: download(url, dst, policy), policy)
    if parts.scheme == "s3":
        presigned = _presign_s3(url)
        return _unpack_download(target, lambda dst: download(presigned, dst, policy), policy)
    raise StoreError(
        f"cannot fetch {redact_url(url)!r}: use a directory, file://, s3://, http:// or https://"
    )


def fetch_named(
    store_url: str | None, name: str, version: int, target: Path, policy: FetchPolicy
) -> Path:
    """``{name, version}`` through the agent's store: bounded by the size the index names."""
    if not store_url:
        raise StoreError(
            f"cannot resolve {name} v{version}: the agent has no --store; send a url instead"
        )
    from cloud_sync.registry import Registry
    from cloud_sync.store import open_store

    store = open_store(store_url)
    registry = Registry(store)
    entry = registry.entry(name, version)
    url = registry.pack_url(name, version)
    bounded = FetchPolicy(
        (*policy.roots, *_store_root(store_url)),
        min(policy.max_bytes, entry.archive_size),
        policy.token,
    )

    def get(dst: Path) -> None:
        if url.startswith("file:"):
            src = Path(unquote(urlsplit(url).path))
            if not bounded.allows(src) or src.stat().st_size > bounded.max_bytes:
                raise SizeLimitError(f"{name} v{version} is not the size its index names")
            shutil.copyfile(src, dst)
        else:
            download(url, dst, bounded)
        if _sha256(dst) != entry.archive_sha256:
            raise IntegrityError(
                f"the archive of {name} v{version} does not match its sha256 in the registry"
            )

    return _unpack_download(target, get, policy)


def _store_root(store_url: str) -> tuple[Path, ...]:
    parts = urlsplit(store_url)
    if parts.scheme == "s3":
        return ()
    return (Path(unquote(parts.path) if parts.scheme == "file" else store_url),)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_local(path: Path, target: Path, limits: Limits) -> Path:
    if path.is_dir():
        try:
            shutil.copytree(path, target, symlinks=True)
        except OSError as exc:
            raise StoreError(f"cannot copy the pack at {path}: {exc}") from exc
        return target
    if path.is_file():
        return extract_archive(path, target, limits)
    raise NotFoundError(f"no pack at {path}")


def _unpack_download(target: Path, get: Callable[[Path], None], policy: FetchPolicy) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download.") as tmp:
        archive = Path(tmp) / f"pack{ARCHIVE_SUFFIX}"
        get(archive)
        try:
            return extract_archive(archive, target, policy.unpack_limits)
        except ArchiveError as exc:
            raise ArchiveError(f"the download is not a pack archive: {exc}") from exc


def download(url: str, dst: Path, policy: FetchPolicy) -> None:
    """``url`` into ``dst``: at most ``policy.max_bytes``, within the token's deadline."""
    shown = redact_url(url)
    token = policy.token or CancelToken()
    try:
        timeout = token.remaining(READ_TIMEOUT_S)
        with urllib.request.urlopen(url, timeout=timeout) as response, dst.open("wb") as out:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > policy.max_bytes:
                raise SizeLimitError(f"{shown} is {declared} bytes; the cap is {policy.max_bytes}")
            total = 0
            while True:
                token.check(f"downloading {shown}")
                _set_timeout(response, token.remaining(READ_TIMEOUT_S))
                chunk = (
                    response.read1(_CHUNK) if hasattr(response, "read1") else response.read(_CHUNK)
                )
                if not chunk:
                    break
                total += len(chunk)
                if total > policy.max_bytes:
                    raise SizeLimitError(f"{shown} is larger than {policy.max_bytes} bytes")
                out.write(chunk)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise NotFoundError(f"{shown}: 404 not found") from exc
        raise StoreError(f"cannot download {shown}: HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        token.check(f"downloading {shown}")  # a read cut short by the deadline says so
        reason = getattr(exc, "reason", exc)
        raise StoreError(f"cannot download {shown}: {redact_url(str(reason))}") from exc


def _set_timeout(response: object, seconds: float) -> None:
    """Each read waits at most ``seconds`` (the socket under http.client's response)."""
    fp = getattr(response, "fp", None)
    raw = getattr(fp, "raw", None)
    sock = getattr(raw, "_sock", None)
    if sock is not None:
        sock.settimeout(seconds)


def _presign_s3(url: str) -> str:
    from cloud_sync.store import open_store

    parts = urlsplit(url)
    key = parts.path.lstrip("/")
    if not key:
        raise StoreError(f"{redact_url(url)} names a bucket, not a pack archive")
    return open_store(f"s3://{parts.netloc}").presign(key)


__all__: Sequence[str] = ("FetchPolicy", "download", "fetch_named", "fetch_url")
