"""Getting a pack onto the disk, from wherever the deploy command says it lives.

Nothing here trusts what it fetched: the updater verifies the result with ``load_pack``.
"""

from __future__ import annotations

import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlsplit

from modelpack.archive import ARCHIVE_SUFFIX, extract_archive
from modelpack.errors import ArchiveError, NotFoundError, SizeLimitError, StoreError

MAX_DOWNLOAD_BYTES = 1 << 30
_CHUNK = 1 << 16


def fetch_url(url: str, target: Path) -> Path:
    """A directory, ``file://`` (dir or .tar.gz), ``http(s)://`` or ``s3://`` into ``target``."""
    parts = urlsplit(url)
    if parts.scheme in ("", "file"):
        return _fetch_local(Path(unquote(parts.path) if parts.scheme else url), target)
    if parts.scheme in ("http", "https"):
        return _unpack_download(target, lambda dst: _download_http(url, dst))
    if parts.scheme == "s3":
        return _unpack_download(target, lambda dst: _download_s3(url, dst))
    raise StoreError(f"cannot fetch {url!r}: use a directory, file://, s3://, http:// or https://")


def fetch_named(store_url: str | None, name: str, version: int, target: Path) -> Path:
    """``{name, version}`` resolved through the agent's store by the cloud_sync registry."""
    if not store_url:
        raise StoreError(
            f"cannot resolve {name} v{version}: the agent has no --store; send a url instead"
        )
    from cloud_sync.registry import Registry
    from cloud_sync.store import open_store

    return Path(Registry(open_store(store_url)).fetch(name, version, target))


def _fetch_local(path: Path, target: Path) -> Path:
    if path.is_dir():
        try:
            shutil.copytree(path, target, symlinks=True)
        except OSError as exc:
            raise StoreError(f"cannot copy the pack at {path}: {exc}") from exc
        return target
    if path.is_file():
        return extract_archive(path, target)
    raise NotFoundError(f"no pack at {path}")


def _unpack_download(target: Path, download: object) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download.") as tmp:
        archive = Path(tmp) / f"pack{ARCHIVE_SUFFIX}"
        download(archive)  # type: ignore[operator]
        try:
            return extract_archive(archive, target)
        except ArchiveError as exc:
            raise ArchiveError(f"the download is not a pack archive: {exc}") from exc


def _download_http(url: str, dst: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=30) as response, dst.open("wb") as out:
            total = 0
            while chunk := response.read(_CHUNK):
                total += len(chunk)
                if total > MAX_DOWNLOAD_BYTES:
                    raise SizeLimitError(f"{url} is larger than {MAX_DOWNLOAD_BYTES} bytes")
                out.write(chunk)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise NotFoundError(f"{url}: 404 not found") from exc
        raise StoreError(f"cannot download {url}: HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise StoreError(f"cannot download {url}: {exc}") from exc


def _download_s3(url: str, dst: Path) -> None:
    from cloud_sync.store import open_store

    parts = urlsplit(url)
    key = parts.path.lstrip("/")
    if not key:
        raise StoreError(f"{url} names a bucket, not a pack archive")
    open_store(f"s3://{parts.netloc}").get_file(key, dst)
