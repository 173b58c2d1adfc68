"""``ObjectStore``, what every object store offers (the API is in ``cloud_sync.store``'s
docstring), and the rule every key obeys. Apart from ``cloud_sync.store``, which opens a store by
its URL, so that the implementations (``LocalStore`` there, ``S3Store`` in ``cloud_sync.s3store``)
build on this module and the opener imports them without a circle."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

from modelpack.errors import StoreError

# The local store writes each object beside it under this prefix first; no key may take it.
TMP_PREFIX = ".tmp-"


def check_key(key: str) -> str:
    """A key is relative and plain: no leading '/', no '.' or '..' parts, no backslash."""
    parts = key.split("/")
    if (
        not key
        or key.startswith("/")
        or "\\" in key
        or any(p in ("", ".", "..") for p in parts)
        or parts[-1].startswith(TMP_PREFIX)
    ):
        raise StoreError(f"invalid object key {key!r}")
    return key


class ObjectStore(ABC):
    """Bytes under keys. Writes are atomic per object; there is no rename and no append."""

    url: str

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        """The bytes of ``key``; past ``max_bytes`` SizeLimitError, having read at most one
        byte more (an object planted to be huge costs its reader no more than the cap)."""

    @abstractmethod
    def put_file(self, key: str, path: Path) -> None: ...

    @abstractmethod
    def get_file(self, key: str, path: Path, max_bytes: int | None = None) -> Path:
        """Download ``key`` to ``path``; past ``max_bytes`` it stops reading (SizeLimitError)."""

    @abstractmethod
    def create(self, key: str, data: bytes) -> str:
        """Write ``key`` only if it does not exist (ConflictError otherwise); its etag."""

    @abstractmethod
    def read(self, key: str, max_bytes: int | None = None) -> tuple[bytes, str]:
        """The bytes of ``key`` and the etag a later ``replace`` must name; ``max_bytes`` as
        ``get_bytes``."""

    @abstractmethod
    def replace(self, key: str, data: bytes, etag: str) -> str:
        """Overwrite ``key`` only if it is still at ``etag`` (ConflictError otherwise)."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def presign(self, key: str, expires_s: int = 3600) -> str: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"
