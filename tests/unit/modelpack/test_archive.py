"""The single-file pack form: round trip, and every unsafe member refused with nothing written."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from modelpack import ArchiveError, extract_archive, load_pack, write_archive


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def test_round_trip_keeps_a_verifiable_pack(
    signed_pack: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    archive = write_archive(signed_pack, tmp_path / "tiny-1.tar.gz")
    unpacked = extract_archive(archive, tmp_path / "unpacked")
    assert load_pack(unpacked, trusted=[keys[1]]).manifest.version == 1


def _link(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (_file("../evil.txt"), "climbs out with '..'"),
        (_file("sub/../../evil.txt"), "climbs out with '..'"),
        (_file("/tmp/evil.txt"), "has an absolute path"),
        (_link("model.onnx", "/etc/passwd", tarfile.SYMTYPE), "is a link"),
        (_link("model.onnx", "../../etc/passwd", tarfile.LNKTYPE), "is a link"),
    ],
)
def test_unsafe_member_is_refused_and_nothing_is_written(
    tmp_path: Path, member: tuple[tarfile.TarInfo, bytes | None], reason: str
) -> None:
    archive = _tar(tmp_path / "a.tar.gz", [_file("manifest.json", b"{}"), member])
    target = tmp_path / "work" / "unpacked"
    with pytest.raises(ArchiveError, match=reason):
        extract_archive(archive, target)
    assert not target.exists()
    assert not (tmp_path / "evil.txt").exists()
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())


def test_device_member_is_refused(tmp_path: Path) -> None:
    info = tarfile.TarInfo("dev")
    info.type = tarfile.CHRTYPE
    archive = _tar(tmp_path / "a.tar.gz", [(info, None)])
    with pytest.raises(ArchiveError, match="not a regular file"):
        extract_archive(archive, tmp_path / "out")


def test_corrupt_archive_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"\x1f\x8b\x08 not really gzip")
    with pytest.raises(ArchiveError):
        extract_archive(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_target_is_not_overwritten(signed_pack: Path, tmp_path: Path) -> None:
    archive = write_archive(signed_pack, tmp_path / "p.tar.gz")
    (tmp_path / "out").mkdir()
    with pytest.raises(ArchiveError, match="exists already"):
        extract_archive(archive, tmp_path / "out")
