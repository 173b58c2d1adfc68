"""The single-file form of a pack for transport: a gzipped tar, unpacked safely."""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from modelpack.errors import ArchiveError, SizeLimitError
from modelpack.loader import DEFAULT_LIMITS, Limits

ARCHIVE_SUFFIX = ".tar.gz"


def write_archive(root: Path, out: Path) -> Path:
    """Write every regular file of the pack into a .tar.gz (no owners, no links, sorted)."""
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


def extract_archive(archive: Path, target: Path, limits: Limits = DEFAULT_LIMITS) -> Path:
    """Unpack a pack archive into ``target`` (which must not exist yet).

    Every member is checked before anything is written; extraction goes to a temporary
    directory beside the target that is renamed into place only when all went well.
    """
    if target.exists():
        raise ArchiveError(f"{target} exists already")
    try:
        tar = tarfile.open(archive, "r:*")  # noqa: SIM115 - closed by the with below
    except (OSError, tarfile.TarError) as exc:
        raise ArchiveError(f"{archive.name} is not a readable tar archive: {exc}") from exc
    with tar:
        try:
            members = tar.getmembers()
        except (OSError, tarfile.TarError, EOFError) as exc:
            raise ArchiveError(f"{archive.name} is truncated or corrupt: {exc}") from exc
        if len(members) > limits.max_files:
            raise SizeLimitError(f"the archive holds more than {limits.max_files} members")
        total = 0
        for member in members:
            _check_member(member)
            total += member.size
        if total > limits.max_pack_bytes:
            raise SizeLimitError(
                f"the archive unpacks to {total} bytes; the cap is {limits.max_pack_bytes}"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            tar.extractall(staging, filter="data")
            os.replace(staging, target)
        except (OSError, tarfile.TarError, EOFError) as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise ArchiveError(f"cannot unpack {archive.name}: {exc}") from exc
    return target
