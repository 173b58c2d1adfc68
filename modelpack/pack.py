"""The verified ``Pack`` every stage passes on, its golden samples, and the listing of a pack's
files. Creating and signing a pack is ``modelpack.writer``'s (it verifies with the loader, which
returns a ``Pack``)."""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modelpack.errors import LayoutError, PackError
from modelpack.hashing import sha256_bytes, sha256_file
from modelpack.manifest import (
    MANIFEST_FILE,
    MODEL_FILE,
    SAMPLES_FILE,
    SIGNATURE_FILE,
    FileEntry,
    Manifest,
)

INPUT_PREFIX = "inputs/"
OUTPUT_PREFIX = "outputs/"


@dataclass(frozen=True)
class Samples:
    """Golden inputs and the outputs the model must reproduce on them."""

    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]


@dataclass(frozen=True)
class Pack:
    """A pack directory whose manifest, signature and files were verified by ``load_pack``."""

    root: Path
    manifest: Manifest
    manifest_sha256: str
    signed_by: str | None  # key id, or None when loaded unsigned on request

    @property
    def model_path(self) -> Path:
        return self.root / MODEL_FILE

    @property
    def samples(self) -> Samples | None:
        if self.manifest.file(SAMPLES_FILE) is None:
            return None
        return read_samples(self.root / SAMPLES_FILE)


def write_samples(
    path: Path, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]
) -> None:
    arrays = {INPUT_PREFIX + k: np.asarray(v) for k, v in inputs.items()}
    arrays.update({OUTPUT_PREFIX + k: np.asarray(v) for k, v in outputs.items()})
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
    path.write_bytes(buffer.getvalue())


def read_samples(path: Path) -> Samples:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise PackError(f"{path.name} is not a readable npz of golden samples: {exc}") from exc
    return Samples(
        inputs={k[len(INPUT_PREFIX) :]: v for k, v in arrays.items() if k.startswith(INPUT_PREFIX)},
        outputs={
            k[len(OUTPUT_PREFIX) :]: v for k, v in arrays.items() if k.startswith(OUTPUT_PREFIX)
        },
    )


def list_files(root: Path) -> list[FileEntry]:
    """Every regular file under root but the manifest and its signature, hashed."""
    entries = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            raise LayoutError(f"{rel} is a symlink; packs hold regular files only")
        if path.is_dir() or rel in (MANIFEST_FILE, SIGNATURE_FILE):
            continue
        entries.append(FileEntry(path=rel, sha256=sha256_file(path), size=path.stat().st_size))
    return entries


def source_sha256(source: Path) -> str:
    """The ``parent`` of a pack made from ``source``: the sha256 of a model file's bytes; of a
    directory (a SavedModel), the sha256 of its listing, each file's path and sha256, sorted."""
    if not source.is_dir():
        return sha256_file(source)
    listing = sorted(
        f"{p.relative_to(source).as_posix()}\0{sha256_file(p)}\n"
        for p in source.rglob("*")
        if p.is_file() and not p.is_symlink()
    )
    return sha256_bytes("".join(listing).encode())
