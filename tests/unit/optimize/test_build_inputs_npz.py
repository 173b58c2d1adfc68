"""``.npz`` data read without trusting its headers: only what is asked for, sizes checked first."""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from modelpack.errors import ConfigError
from modelpack.iosig import read_io_signature
from optimize.data import load_npz
from optimize.npz import open_npz
from tests.support.zipbomb import write_npz_bomb

DTYPES = st.sampled_from(["<f4", ">f4", "<f8", "<f2", "<i8", ">i4", "|u1", "|b1", "<c8"])
CASES = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _npy_header(dtype: str, shape: tuple[int, ...], fortran: bool = False) -> bytes:
    """A version 1.0 ``.npy`` header as numpy writes it, for any shape it claims."""
    text = f"{{'descr': '{dtype}', 'fortran_order': {fortran}, 'shape': {shape!r}, }}"
    text += " " * (63 - (len(text) + 10) % 64) + "\n"  # padded to 64 bytes, as numpy pads
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")


def _write_members(path: Path, members: dict[str, bytes], compress: bool = True) -> None:
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)


@given(
    arrays=st.dictionaries(
        st.text("abcxyz_", min_size=1, max_size=6),
        hnp.arrays(DTYPES, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)),
        min_size=1,
        max_size=3,
    ),
    compressed=st.booleans(),
    fortran=st.booleans(),
)
@CASES
def test_what_numpy_writes_reads_back_exactly(
    tmp_path: Path, arrays: dict[str, np.ndarray], compressed: bool, fortran: bool
) -> None:
    arrays = {k: np.asfortranarray(v) if fortran else v for k, v in arrays.items()}
    path = tmp_path / "data.npz"
    (np.savez_compressed if compressed else np.savez)(path, **arrays)  # type: ignore[operator]
    got = open_npz(path)
    assert set(got) == set(arrays)
    for name, want in arrays.items():
        # Big-endian data comes back native: ONNX Runtime would misread it silently.
        assert got[name].dtype == want.dtype.newbyteorder("=") and got[name].dtype.isnative
        assert got[name].shape == want.shape
        np.testing.assert_array_equal(got[name], want)


@given(
    shape=st.lists(st.integers(0, 2**40), min_size=0, max_size=4).map(tuple),
    dtype=st.sampled_from(["<f4", "<f8", "<i2", "|u1"]),
    held=st.integers(0, 256),
    fortran=st.booleans(),
)
@CASES
def test_a_header_claiming_more_than_its_member_holds_is_refused(
    tmp_path: Path, shape: tuple[int, ...], dtype: str, held: int, fortran: bool
) -> None:
    """Whatever shape a header claims, an array is built only when the member holds its bytes
    and it fits the cap; otherwise the reader says so, and nothing else escapes."""
    path = tmp_path / "claims.npz"
    _write_members(path, {"x.npy": _npy_header(dtype, shape, fortran) + b"\x01" * held})
    need = int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize
    itemsize = np.dtype(dtype).itemsize
    indexable = int(np.prod([d for d in shape if d], dtype=object)) * itemsize < 2**63
    arrays = open_npz(path, limit=1 << 20)
    if need <= held and need <= 1 << 20 and indexable:
        assert arrays["x"].shape == shape
    else:
        with pytest.raises(ConfigError, match=r"claims|cap|past what any array"):
            arrays["x"]


@given(junk=st.binary(min_size=0, max_size=120))
@CASES
def test_a_broken_member_is_a_config_error(tmp_path: Path, junk: bytes) -> None:
    path = tmp_path / "junk.npz"
    _write_members(path, {"x.npy": b"\x93NUMPY" + junk})
    try:
        open_npz(path)["x"]
    except ConfigError as exc:
        assert "\n" not in str(exc)


def test_only_the_arrays_the_model_takes_are_read(
    wide_mlp: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deflated bomb beside the real input is never decompressed, and refused when asked for."""
    monkeypatch.setenv("EDGEBENTO_MAX_DATA_BYTES", str(512 << 20))
    inputs, _ = read_io_signature(wide_mlp)
    path = tmp_path / "data.npz"
    write_npz_bomb(path, {"unused": 16})  # 1 GiB of zeros in 1 MB
    x = np.random.default_rng(0).standard_normal((6, 16)).astype(np.float32)
    buffer = io.BytesIO()
    np.save(buffer, x)
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", buffer.getvalue())
    data = load_npz(path, inputs)
    np.testing.assert_array_equal(data.inputs["x"], x)
    assert data.inputs["x"].dtype == np.float32
    with pytest.raises(ConfigError, match=r"'unused' would take 1.0 GiB .* past the 512.0 MiB cap"):
        open_npz(path)["unused"]


def test_objects_and_duplicate_names_are_refused(tmp_path: Path) -> None:
    objects = tmp_path / "objects.npz"
    _write_members(objects, {"x.npy": _npy_header("|O", (2,)) + b"\x80\x04N."})
    with pytest.raises(ConfigError, match="holds Python objects"):
        open_npz(objects)["x"]
    twice = tmp_path / "twice.npz"
    with zipfile.ZipFile(twice, "w") as archive, pytest.warns(UserWarning, match="Duplicate"):
        archive.writestr("x.npy", _npy_header("<f4", (1,)) + bytes(4))
        archive.writestr("x.npy", _npy_header("<f4", (1,)) + bytes(4))
    with pytest.raises(ConfigError, match="holds the array 'x' twice"):
        open_npz(twice)


def test_the_cap_counts_every_array_read(tmp_path: Path) -> None:
    path = tmp_path / "two.npz"
    np.savez(path, a=np.zeros(200, np.float32), b=np.zeros(200, np.float32))
    arrays = open_npz(path, limit=1000)
    assert arrays["a"].nbytes == 800
    with pytest.raises(ConfigError, match=r"reading 'b' \(800 B\) brings the data past"):
        arrays["b"]


def test_the_cap_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "one.npz"
    np.savez(path, a=np.zeros(100, np.float32))
    monkeypatch.setenv("EDGEBENTO_MAX_DATA_BYTES", "100")
    with pytest.raises(ConfigError, match="past the 100 B cap; set EDGEBENTO_MAX_DATA_BYTES"):
        open_npz(path)["a"]
    monkeypatch.setenv("EDGEBENTO_MAX_DATA_BYTES", "lots")
    with pytest.raises(ConfigError, match="must be a number of bytes"):
        open_npz(path)


@pytest.mark.parametrize(
    "array",
    [
        np.array(["a", "bb"]),
        np.array([b"xy"]),
        np.zeros(2, dtype=[("a", "<f4"), ("b", "<i4")]),
        np.array(["2026-01-01"], dtype="datetime64[D]"),
        np.zeros(2, dtype="V8"),
    ],
    ids=["unicode", "bytes", "record", "datetime", "void"],
)
def test_data_that_is_not_numbers_is_one_error(tmp_path: Path, array: np.ndarray) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=array)
    with pytest.raises(ConfigError, match="only numbers and booleans load"):
        open_npz(path)["x"]


def test_big_endian_and_fortran_data_reach_onnx_runtime_as_written(tmp_path: Path) -> None:
    """A model run on the arrays sees the values the file holds, not their bytes reinterpreted."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    session = ort.InferenceSession(model.SerializeToString())
    want = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    path = tmp_path / "d.npz"
    np.savez(path, big=want.astype(">f4"), fortran=np.asfortranarray(want.astype(">f4")))
    arrays = open_npz(path)
    for name in ("big", "fortran"):
        (got,) = session.run(None, {"x": arrays[name]})
        np.testing.assert_array_equal(got, want)


def test_a_member_that_is_not_npy_fails_only_when_asked_for(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    _write_members(path, {"x.npy": _npy(np.ones(3, np.float32)), "notes.txt": b"hello"})
    arrays = open_npz(path)
    np.testing.assert_array_equal(arrays["x"], np.ones(3, np.float32))
    with pytest.raises(ConfigError, match=r"is not a \.npy array"):
        arrays["notes.txt"]


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()
