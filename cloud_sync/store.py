"""The object store both the cloud and the devices use: S3 (through boto3) or a local directory.

Import path and API (keys are ``/``-separated, relative, never ``..``)::

    from cloud_sync.store import ObjectStore, open_store

    store: ObjectStore = open_store("s3://bucket/prefix")   # or "file:///path" or "/plain/path"
    store = open_store(url, endpoint_url=None, region=None)  # endpoint also from AWS_ENDPOINT_URL
    store.put_bytes(key: str, data: bytes) -> None           # atomic: readers see old or new
    store.create(key: str, data: bytes) -> str               # create-only; ConflictError if taken
    store.read(key: str, max_bytes=None) -> tuple[bytes, str]  # the bytes and their etag
    store.replace(key: str, data: bytes, etag: str) -> str   # only if still at etag, else Conflict
    store.get_bytes(key: str, max_bytes=None) -> bytes       # NotFoundError; SizeLimitError
    store.put_file(key: str, path: Path) -> None             # multipart on S3 for big files
    store.get_file(key: str, path: Path, max_bytes=None) -> Path   # NotFoundError; SizeLimitError
    store.exists(key: str) -> bool
    store.list(prefix: str = "") -> list[str]                # sorted keys under prefix
    store.delete(key: str) -> None                           # missing key: no error
    store.presign(key: str, expires_s: int = 3600) -> str    # https URL (S3) or file:// URL
    store.url -> str                                         # the URL it was opened with

Every failure is a ``modelpack.errors.StoreError`` (``NotFoundError`` for a missing object,
``ConflictError`` for a conditional write that lost). The conditional writes are S3's own
(``If-None-Match: *`` and ``If-Match: etag`` on PutObject); the local store gives the same
guarantee among the processes of one host with ``link(2)`` (create) and ``flock(2)`` (replace).
Both implementations use the same key layout, so a directory synced with ``aws s3 sync`` works
as a store and the other way round.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from cloud_sync.object_store import TMP_PREFIX, ObjectStore, check_key
from cloud_sync.s3store import S3Store
from modelpack.errors import ConflictError, NotFoundError, SizeLimitError, StoreError


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_capped(src: Path, fh: object, max_bytes: int | None) -> None:
    with src.open("rb") as inp:
        copied = 0
        while chunk := inp.read(1 << 20):
            copied += len(chunk)
            if max_bytes is not None and copied > max_bytes:
                raise SizeLimitError(f"{src.name} is over its expected {max_bytes} bytes")
            fh.write(chunk)  # type: ignore[attr-defined]


def write_atomic(
    path: Path,
    data: bytes | None = None,
    source: Path | None = None,
    *,
    exclusive: bool = False,
    max_bytes: int | None = None,
) -> None:
    """Write a temp file beside ``path``, fsync it, rename it over ``path``.

    ``exclusive``: link it to ``path`` instead, which fails when ``path`` exists, so of two
    writers exactly one creates the file (FileExistsError for the other).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            if source is not None:
                _copy_capped(source, fh, max_bytes)
            else:
                fh.write(data or b"")
            fh.flush()
            os.fsync(fh.fileno())
        if exclusive:
            os.link(tmp, path)
            tmp.unlink()
        else:
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _capped(data: bytes, max_bytes: int, key: str, url: str) -> bytes:
    """``data`` (at most ``max_bytes`` + 1 bytes read), or SizeLimitError past the cap."""
    if len(data) > max_bytes:
        raise SizeLimitError(f"{key} in {url} is over {max_bytes} bytes")
    return data


def _etag(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()  # what S3 says of a plain PUT


class LocalStore(ObjectStore):
    """A directory: the embedded default, and what tests without S3 use."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().resolve()
        self.url = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def put_bytes(self, key: str, data: bytes) -> None:
        try:
            write_atomic(self._path(key), data)
        except OSError as exc:
            raise StoreError(f"cannot write {key} to {self.url}: {exc}") from exc

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        try:
            if max_bytes is None:
                return self._path(key).read_bytes()
            with self._path(key).open("rb") as fh:
                return _capped(fh.read(max(0, max_bytes) + 1), max_bytes, key, self.url)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise NotFoundError(f"{key} is not in {self.url}") from exc
        except OSError as exc:
            raise StoreError(f"cannot read {key} from {self.url}: {exc}") from exc

    def put_file(self, key: str, path: Path) -> None:
        try:
            write_atomic(self._path(key), source=Path(path))
        except OSError as exc:
            raise StoreError(f"cannot copy {path} to {key} in {self.url}: {exc}") from exc

    def get_file(self, key: str, path: Path, max_bytes: int | None = None) -> Path:
        src = self._path(key)
        if not src.is_file():
            raise NotFoundError(f"{key} is not in {self.url}")
        try:
            write_atomic(Path(path), source=src, max_bytes=max_bytes)
        except SizeLimitError as exc:
            raise SizeLimitError(f"{key} in {self.url}: {exc}") from exc
        except FileNotFoundError as exc:
            raise NotFoundError(f"{key} is not in {self.url}") from exc
        except OSError as exc:
            raise StoreError(f"cannot copy {key} from {self.url} to {path}: {exc}") from exc
        return Path(path)

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[Path]:
        """The key's path, with its directory locked against other conditional writers."""
        import fcntl

        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield path
        finally:
            os.close(fd)  # closing drops the lock

    def create(self, key: str, data: bytes) -> str:
        try:
            with self._locked(key) as path:
                write_atomic(path, data, exclusive=True)
        except FileExistsError as exc:
            raise ConflictError(f"{key} exists in {self.url} already") from exc
        except OSError as exc:
            raise StoreError(f"cannot create {key} in {self.url}: {exc}") from exc
        return _etag(data)

    def read(self, key: str, max_bytes: int | None = None) -> tuple[bytes, str]:
        data = self.get_bytes(key, max_bytes)
        return data, _etag(data)

    def replace(self, key: str, data: bytes, etag: str) -> str:
        try:
            with self._locked(key) as path:
                try:
                    current = _etag(path.read_bytes())
                except FileNotFoundError as exc:
                    raise ConflictError(f"{key} is gone from {self.url}") from exc
                if current != etag:
                    raise ConflictError(f"{key} in {self.url} changed since it was read")
                write_atomic(path, data)
        except OSError as exc:
            raise StoreError(f"cannot replace {key} in {self.url}: {exc}") from exc
        return _etag(data)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        keys = []
        for dirpath, _dirs, files in os.walk(self.root):
            rel = PurePosixPath(Path(dirpath).relative_to(self.root).as_posix())
            for name in files:
                if name.startswith(TMP_PREFIX):
                    continue
                key = name if str(rel) == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot delete {key} from {self.url}: {exc}") from exc

    def presign(self, key: str, expires_s: int = 3600) -> str:
        # A local file needs no signature; the URL is what a device on this host can open.
        return self._path(key).as_uri()


def open_store(
    url: str | Path, *, endpoint_url: str | None = None, region: str | None = None
) -> ObjectStore:
    """Open ``s3://bucket/prefix``, ``file:///path`` or a plain directory path."""
    text = str(url)
    parsed = urlparse(text)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StoreError(f"{text} names no bucket (expected s3://bucket/prefix)")
        return S3Store(
            parsed.netloc, parsed.path.strip("/"), endpoint_url=endpoint_url, region=region
        )
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StoreError(f"{text}: file URLs must name a local path (file:///path)")
        return LocalStore(parsed.path)
    if "://" not in text:
        return LocalStore(text)
    raise StoreError(
        f"unsupported store URL {text!r}: use s3://bucket/prefix, file:///path or a path"
    )
