"""Reading ``.npz`` data without trusting it: only the arrays asked for, sizes checked first.

``np.load`` on an ``.npz`` decompresses whatever member is asked for, to whatever size its
header claims. A few hundred kilobytes of deflated zeros then become gigabytes. Here each
member's zip header (its declared uncompressed size, which ``zipfile`` never reads past) and its
``.npy`` header (dtype and shape) are read first; an array is allocated only when it is asked
for, fits the member that holds it, and keeps the total under a cap.
"""

from __future__ import annotations

import math
import os
import stat
import sys
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from modelpack.errors import ConfigError

DEFAULT_LIMIT = 2 << 30  # bytes of arrays one data file may bring into memory
LIMIT_ENV = "EDGEBENTO_MAX_DATA_BYTES"
CHUNK = 4 << 20  # read in pieces: no second full-size buffer beside the array
MAX_HEADER = 10_000  # numpy's own bound on a .npy header


def data_limit() -> int:
    """The cap on array bytes, from ``EDGEBENTO_MAX_DATA_BYTES`` when it is set."""
    raw = os.environ.get(LIMIT_ENV)
    if raw is None:
        return DEFAULT_LIMIT
    try:
        value = int(raw)
    except ValueError as exc:
        raise ConfigError(f"{LIMIT_ENV} must be a number of bytes, not {raw!r}") from exc
    if value <= 0:
        raise ConfigError(f"{LIMIT_ENV} must be positive, not {value}")
    return value


def nbytes(shape: Iterable[int], dtype: np.dtype) -> int:
    """Bytes an array of ``shape`` needs, in Python ints: no overflow, nothing allocated."""
    return math.prod(int(d) for d in shape) * dtype.itemsize


def check_fits(what: str, shape: Iterable[int], dtype: np.dtype, limit: int | None = None) -> int:
    """Refuse an array past the cap before anything is allocated; return its size."""
    dims = [int(d) for d in shape]
    if any(d < 0 for d in dims):
        raise ConfigError(f"{what} has a negative dim in {dims}")
    size = nbytes(dims, np.dtype(dtype))
    if math.prod(d for d in dims if d) * np.dtype(dtype).itemsize > sys.maxsize:
        # No array has such dims, not even an empty one: numpy cannot index it.
        raise ConfigError(f"{what} has dims {dims} past what any array can have")
    cap = data_limit() if limit is None else limit
    if size > cap:
        raise ConfigError(
            f"{what} would take {_human(size)} ({np.dtype(dtype)}{dims}), past the"
            f" {_human(cap)} cap; set {LIMIT_ENV} to raise it"
        )
    return size


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Member:
    """One array of the archive as its headers describe it; nothing read past the header."""

    zip_name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    fortran: bool
    nbytes: int


class NpzArrays(Mapping[str, np.ndarray]):
    """A read-only mapping from array name to array; each array is read when first asked for.

    Building it reads only the zip directory. ``limit`` caps the bytes of all arrays read through
    one instance together, checked before each is allocated.
    """

    def __init__(
        self,
        path: Path | IO[bytes],
        limit: int | None = None,
        skip: Iterable[str] = (),
        name: str | None = None,
    ) -> None:
        # An .npz inside another archive (a Keras 3 file's weights) comes as bytes and a name.
        self.path = Path(name if name is not None else path)  # type: ignore[arg-type]
        self.limit = data_limit() if limit is None else limit
        self._read: dict[str, np.ndarray] = {}
        self._used = 0
        try:
            self._zip = zipfile.ZipFile(path)
        except (OSError, zipfile.BadZipFile, ValueError) as exc:
            raise ConfigError(f"{self.path} is not a readable .npz file: {exc}") from exc
        self._names = self._directory(set(skip))

    def _directory(self, skip: set[str]) -> dict[str, str]:
        names: dict[str, str] = {}
        for info in self._zip.infolist():
            if info.is_dir():
                continue
            if stat.S_ISLNK(info.external_attr >> 16):
                # zipfile reads the link's text, never its target, but an unzip would follow it
                # to any file of this machine: no .npz writer stores one.
                raise ConfigError(f"{self.path.name} holds {info.filename!r}, a symbolic link")
            name = info.filename.removesuffix(".npy")
            if name in names:  # zipfile would silently take the last one
                raise ConfigError(f"{self.path.name} holds the array {name!r} twice")
            if name not in skip:
                names[name] = info.filename
        return names

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._read:
            if name not in self._names:
                raise KeyError(name)
            self._read[name] = self._load(name)
        return self._read[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def member(self, name: str) -> Member:
        """The dtype and shape ``name`` declares, read from its headers only."""
        info = self._zip.getinfo(self._names[name])
        with self._open(info) as stream:
            return self._header(name, info, stream)

    def _open(self, info: zipfile.ZipInfo) -> IO[bytes]:
        try:
            return self._zip.open(info)
        except (OSError, zipfile.BadZipFile, NotImplementedError, RuntimeError) as exc:
            raise ConfigError(f"{self.path.name}: cannot open {info.filename}: {exc}") from exc

    def _header(self, name: str, info: zipfile.ZipInfo, stream: IO[bytes]) -> Member:
        where = f"{self.path.name}: array {name!r}"
        try:
            version = np.lib.format.read_magic(stream)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read(stream, max_header_size=MAX_HEADER)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise ConfigError(f"{where} is not a .npy array: {exc}") from exc
        if dtype.hasobject:
            raise ConfigError(f"{where} holds Python objects ({dtype}); only numeric data loads")
        if dtype.kind not in "biufc" or dtype.fields is not None or dtype.subdtype is not None:
            # Strings, records, dates: no model input is made of them, and a later astype
            # would fail with a traceback rather than this line.
            raise ConfigError(f"{where} holds {dtype} data; only numbers and booleans load")
        size = check_fits(where, shape, dtype, self.limit)
        header = stream.tell()
        if size > info.file_size - header:  # the member cannot hold what its header claims
            raise ConfigError(
                f"{where} claims {dtype}{list(shape)} ({_human(size)}) but its member holds"
                f" {_human(max(0, info.file_size - header))}"
            )
        return Member(info.filename, dtype, tuple(shape), bool(fortran), size)

    def _load(self, name: str) -> np.ndarray:
        info = self._zip.getinfo(self._names[name])
        with self._open(info) as stream:
            member = self._header(name, info, stream)
            if self._used + member.nbytes > self.limit:
                raise ConfigError(
                    f"{self.path.name}: reading {name!r} ({_human(member.nbytes)}) brings the"
                    f" data past the {_human(self.limit)} cap; set {LIMIT_ENV} to raise it"
                )
            dims = member.shape[::-1] if member.fortran else member.shape
            array = np.empty(dims, dtype=member.dtype)
            self._fill(name, stream, memoryview(array.reshape(-1).view(np.uint8)))  # type: ignore[arg-type]
        if not member.dtype.isnative:
            # ONNX Runtime reads a big-endian buffer as if it were native, silently: swap it in
            # place (no second copy) and call it native.
            array.byteswap(inplace=True)
            array = array.view(member.dtype.newbyteorder("="))
        self._used += member.nbytes
        return array.T if member.fortran else array

    def _fill(self, name: str, stream: IO[bytes], buffer: memoryview) -> None:
        done = 0
        try:
            while done < len(buffer):
                got = stream.readinto(buffer[done : done + CHUNK])  # type: ignore[attr-defined]
                if not got:
                    break
                done += got
        except (OSError, EOFError, zipfile.BadZipFile) as exc:  # bad CRC, broken deflate
            raise ConfigError(f"{self.path.name}: array {name!r} is corrupt: {exc}") from exc
        if done < len(buffer):
            raise ConfigError(f"{self.path.name}: array {name!r} is truncated")

    def close(self) -> None:
        self._zip.close()


def open_npz(
    path: Path | IO[bytes],
    limit: int | None = None,
    skip: Iterable[str] = (),
    name: str | None = None,
) -> NpzArrays:
    """The arrays of ``path``, each read on first use under one cap (``EDGEBENTO_MAX_DATA_BYTES``);
    ``name`` names a file object in messages."""
    return NpzArrays(path, limit, skip, name)
