"""Property tests of the archive reader: whatever the members, it unpacks exactly the safe
regular files it was given, or refuses with a PackError and leaves nothing behind."""

from __future__ import annotations

import io
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelpack import extract_archive
from modelpack.errors import PackError
from modelpack.loader import Limits

LEVEL = st.sampled_from(["a", "b", "model.onnx", "..", ".", "", "x:y", "c\\d", "é"])
NAME = st.lists(LEVEL, min_size=1, max_size=3).map("/".join) | st.sampled_from(["/abs", "a/"])
KIND = st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.FIFOTYPE])
MEMBER = st.tuples(NAME, KIND, st.binary(max_size=64))
LIMITS = Limits(max_files=6, max_pack_bytes=200)


def _archive(members: list[tuple[str, bytes, bytes]], gz: bool) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.REGTYPE:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                info.linkname = "target" if kind == tarfile.SYMTYPE else ""
                tar.addfile(info)
    return buf.getvalue()


def _extract(data: bytes) -> tuple[Path | None, Path]:
    work = Path(tempfile.mkdtemp())
    (work / "a.tar.gz").write_bytes(data)
    try:
        return extract_archive(work / "a.tar.gz", work / "out", LIMITS), work
    except PackError:
        assert not (work / "out").exists()
        assert [p.name for p in work.iterdir()] == ["a.tar.gz"]  # no staging left behind
        return None, work


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(MEMBER, max_size=8), st.booleans())
def test_unpacks_exactly_the_safe_files_or_refuses(members: list, gz: bool) -> None:
    try:
        data = _archive(members, gz)
    except (ValueError, UnicodeError):
        return  # tarfile itself cannot write such a member
    out, _work = _extract(data)
    if out is None:
        return
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # Names as a path reads them ("./a" and "a/" are "a"): two members on one path are refused.
    expected = {PurePosixPath(n).as_posix(): d for n, k, d in members if k == tarfile.REGTYPE}
    assert files == expected
    assert all(k in (tarfile.REGTYPE, tarfile.DIRTYPE) for _, k, _ in members)
    assert len(members) <= LIMITS.max_files
    assert sum(len(d) for _, k, d in members if k == tarfile.REGTYPE) <= LIMITS.max_pack_bytes


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=2048), st.integers(min_value=0, max_value=400))
def test_corrupt_or_truncated_input_is_only_ever_a_pack_error(noise: bytes, cut: int) -> None:
    good = _archive([("manifest.json", tarfile.REGTYPE, b"{}"), ("m", tarfile.REGTYPE, b"1")], True)
    for data in (noise, good[:cut], b"\x1f\x8b" + noise):
        _extract(data)  # raises anything but a PackError: the property fails
