"""The single-file pack form: round trip, and every unsafe member refused with nothing written."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from modelpack import ArchiveError, extract_archive, load_pack, write_archive
from modelpack.errors import PackError


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


def _pax_bomb(path: Path, header_bytes: int) -> Path:
    """A small .tar.gz whose one pax header inflates to ``header_bytes`` (finding 7)."""
    info = tarfile.TarInfo("manifest.json")
    info.size = 2
    info.pax_headers = {"comment": "x" * header_bytes}
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(b"{}"))
    return path


def test_a_huge_pax_header_is_refused_before_it_is_read(tmp_path: Path) -> None:
    import subprocess
    import sys

    bomb = _pax_bomb(tmp_path / "bomb.tar.gz", 250 << 20)
    assert bomb.stat().st_size < 1 << 20  # small on the wire
    # In a fresh process, so its peak memory is the extraction's alone (main: 834 MB).
    code = (
        "import sys; from pathlib import Path; from modelpack import extract_archive\n"
        "try:\n    extract_archive(Path(sys.argv[1]), Path(sys.argv[2]))\n"
        "except Exception as exc:\n    print(type(exc).__name__, exc)\n"
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec from the parent.
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
        "print(hwm.split()[1])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(bomb), str(tmp_path / "out")],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    assert out[0].startswith("SizeLimitError") and "header" in out[0]
    assert int(out[1]) < 200 * 1024, f"peak RSS {int(out[1]) // 1024} MB"
    assert not (tmp_path / "out").exists()


def test_member_count_and_total_size_are_capped_while_streaming(tmp_path: Path) -> None:
    from modelpack.loader import Limits

    many = _tar(tmp_path / "many.tar.gz", [_file(f"f{i}") for i in range(20)])
    with pytest.raises(PackError, match="more than 10 members"):
        extract_archive(many, tmp_path / "a", Limits(max_files=10))
    big = _tar(tmp_path / "big.tar.gz", [_file("a", b"x" * 5000), _file("b", b"y" * 5000)])
    with pytest.raises(PackError, match="more than 8000 bytes"):
        extract_archive(big, tmp_path / "b", Limits(max_pack_bytes=8000))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
