"""The single-file form of a pack for transport: a gzipped tar, unpacked safely and bounded.

Reading streams: members one at a time, with their count, each header's size, the sum of
their sizes and the total decompressed bytes all capped while the bytes arrive, so a small
archive that inflates (a 255 KB file whose pax header is 250 MB) is refused before it is held.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, BinaryIO

from modelpack.errors import ArchiveError, SizeLimitError
from modelpack.loader import DEFAULT_LIMITS, Limits

if TYPE_CHECKING:  # tarfile itself is imported by the two functions that use it (0.35 MB of
    import tarfile  # RSS an edge agent holds only once it receives an archive)

ARCHIVE_SUFFIX = ".tar.gz"
MAX_HEADER_BYTES = 1 << 20  # a pax or long-name header; real ones are a few hundred bytes
_BLOCK = 512  # tarfile.BLOCKSIZE
_CHUNK = 1 << 16


def write_archive(root: Path, out: Path) -> Path:
    """Write every regular file of the pack into a .tar.gz (no owners, no links, sorted)."""
    import tarfile

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink():
                info = tar.gettarinfo(str(path), arcname=path.relative_to(root).as_posix())
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mtime = 0
                with path.open("rb") as fh:
                    tar.addfile(info, fh)
    os.replace(tmp, out)
    return out


def _check_member(member: tarfile.TarInfo) -> None:
    name = member.name
    parts = PurePosixPath(name).parts
    if name.startswith("/") or "\\" in name or (parts and ":" in parts[0]):
        raise ArchiveError(f"archive member {name!r} has an absolute path")
    if ".." in parts:
        raise ArchiveError(f"archive member {name!r} climbs out with '..'")
    if member.issym() or member.islnk():
        raise ArchiveError(f"archive member {name!r} is a link")
    if not (member.isfile() or member.isdir()):
        raise ArchiveError(f"archive member {name!r} is not a regular file or directory")
    if "\x00" in name or len(name) > 1024 or not parts:
        raise ArchiveError(f"archive member {name[:64]!r} has an unusable name")


class _Bounded:
    """The decompressed archive as tarfile reads it, with two caps checked as bytes arrive.

    No single read may exceed ``max_read``: tarfile reads a pax or GNU long-name header in one
    read of its declared size, so a 250 MB header is refused before it is held in memory (file
    data is read by us, in small chunks). And the total decompressed is capped, which stops a
    gzip bomb whatever its headers say.
    """

    def __init__(self, raw: BinaryIO, max_read: int, max_total: int) -> None:
        self.raw, self.max_read, self.max_total = raw, max_read, max_total
        self.total = 0

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > self.max_read:
            raise SizeLimitError(
                f"an archive header or read of {size} bytes is over the {self.max_read} cap"
            )
        data = self.raw.read(size)
        self.total += len(data)
        if self.total > self.max_total:
            raise SizeLimitError(f"the archive unpacks to more than {self.max_total} bytes")
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()


def _open(archive: Path, limits: Limits) -> tuple[BinaryIO, _Bounded]:
    raw: BinaryIO = archive.open("rb")
    if raw.read(2) == b"\x1f\x8b":
        raw.seek(0)
        raw = gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[assignment]
    else:
        raw.seek(0)
    # Room for the headers of every member beside the data itself.
    overhead = (limits.max_files + 1) * (MAX_HEADER_BYTES + 2 * _BLOCK)
    return raw, _Bounded(raw, MAX_HEADER_BYTES, limits.max_pack_bytes + overhead)


def _members(tar: tarfile.TarFile, limits: Limits) -> Iterator[tarfile.TarInfo]:
    """Members one at a time, each checked, with their count and sizes capped as they come."""
    count = total = 0
    while True:
        member = tar.next()
        if member is None:
            return
        count += 1
        if count > limits.max_files:
            raise SizeLimitError(f"the archive holds more than {limits.max_files} members")
        _check_member(member)
        total += member.size
        if total > limits.max_pack_bytes:
            raise SizeLimitError(
                f"the archive unpacks to more than {limits.max_pack_bytes} bytes; "
                f"the cap is {limits.max_pack_bytes}"
            )
        yield member


def _write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, staging: Path) -> None:
    path = staging / member.name
    if member.isdir():
        path.mkdir(parents=True, exist_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    source = tar.extractfile(member)
    if source is None:
        raise ArchiveError(f"archive member {member.name!r} has no data")
    with source, path.open("xb") as out:
        while chunk := source.read(_CHUNK):
            out.write(chunk)


def extract_archive(archive: Path, target: Path, limits: Limits = DEFAULT_LIMITS) -> Path:
    """Unpack a pack archive into ``target`` (which must not exist yet), streaming.

    Members are read one at a time; each is checked (path, type, count, sizes, header size)
    before a byte of it is written, into a temporary directory beside the target that is
    renamed into place only when all went well and removed otherwise.
    """
    import tarfile

    if target.exists():
        raise ArchiveError(f"{target} exists already")
    try:
        raw, bounded = _open(archive, limits)
    except OSError as exc:
        raise ArchiveError(f"{archive.name} is not a readable tar archive: {exc}") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with raw, tarfile.open(fileobj=bounded, mode="r:") as tar:  # type: ignore[call-overload]
            for member in _members(tar, limits):
                _write_member(tar, member, staging)
        os.replace(staging, target)
    except (OSError, tarfile.TarError, EOFError, zlib.error) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ArchiveError(f"cannot unpack {archive.name}: {exc}") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
