"""Creating and signing ModelPacks. Signing first verifies the files against the manifest with
``modelpack.loader``, which returns the ``Pack`` of ``modelpack.pack``: this module sits above
both, so neither imports it back."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from modelpack.errors import LayoutError, ManifestError, ModelInvalidError
from modelpack.hashing import sha256_file
from modelpack.iosig import read_io_signature
from modelpack.loader import load_pack
from modelpack.manifest import (
    MANIFEST_FILE,
    MODEL_FILE,
    REPORT_FILE,
    SAMPLES_FILE,
    SIGNATURE_FILE,
    Manifest,
    SequenceInput,
)
from modelpack.pack import Samples, list_files, write_samples
from modelpack.signing import load_private_key, sign


def _copy_in(src: Path, dst: Path) -> None:
    if src.resolve() != dst.resolve():
        shutil.copyfile(src, dst)


def create_pack(
    model: Path,
    out: Path,
    *,
    name: str,
    version: int,
    samples: Path | Samples | None = None,
    report: Path | None = None,
    labels: Sequence[str] = (),
    optimization: Mapping[str, Any] | None = None,
    parent: str | None = None,
    expires_at: datetime | None = None,
    sequence: Sequence[SequenceInput] = (),
    metadata: Mapping[str, str] | None = None,
    extras: Sequence[Path] = (),
    key: Path | None = None,
) -> Path:
    """Write a pack directory at ``out`` and return the path of its manifest.

    ``extras`` are further files (report.html, ...) copied in by name and listed like the rest.
    The pack is unsigned unless ``key`` (a signing.key file) is given; ``sign_pack`` signs later.
    ``parent`` is the ``source_sha256`` of the model this one was made from (by default ``model``
    itself: a pack made straight from an ONNX file).
    """
    out.mkdir(parents=True, exist_ok=True)
    stale = [p.name for p in out.iterdir() if p.name != MANIFEST_FILE]
    known = {MODEL_FILE, SAMPLES_FILE, REPORT_FILE, SIGNATURE_FILE, *(p.name for p in extras)}
    if any(n not in known for n in stale):
        raise LayoutError(f"{out} holds other files ({', '.join(sorted(stale))}); use an empty dir")
    (out / SIGNATURE_FILE).unlink(missing_ok=True)
    _copy_in(model, out / MODEL_FILE)
    if isinstance(samples, Samples):
        write_samples(out / SAMPLES_FILE, samples.inputs, samples.outputs)
    elif samples is not None:
        _copy_in(samples, out / SAMPLES_FILE)
    if report is not None:
        _copy_in(report, out / REPORT_FILE)
    for extra in extras:
        _copy_in(extra, out / extra.name)
    inputs, outputs = read_io_signature(out / MODEL_FILE)
    strings = [s.name for s in (*inputs, *outputs) if s.dtype == "string"]
    if strings:  # no target can carry them (tensor JSON, OIP and MQTT serve numbers)
        raise ModelInvalidError(
            f"tensor {strings[0]!r} is a string tensor; edgebento serves numeric tensors only "
            "(tokenize outside the model, as the MiniLM example does)"
        )
    manifest = Manifest(
        name=name,
        version=version,
        created_at=datetime.now(UTC).replace(microsecond=0),
        expires_at=expires_at,
        files=list_files(out),
        inputs=inputs,
        outputs=outputs,
        labels=list(labels),
        optimization=dict(optimization or {}),
        parent=parent or sha256_file(model),
        sequence=list(sequence),
        metadata=dict(metadata or {}),
    )
    _write_atomic(out / MANIFEST_FILE, manifest.to_bytes())
    if key is not None:
        sign_pack(out, key)
    return out / MANIFEST_FILE


def sign_pack(root: Path, key: Path, expires_at: datetime | None = None) -> Path:
    """Check that every file matches the manifest, then write manifest.sig over its bytes.

    With ``expires_at`` the manifest is first rewritten to expire then (TUF's freeze rule: a
    device refuses to newly install a pack past it), so the signature covers the expiry.
    """
    private = load_private_key(key)
    pack = load_pack(root, trusted=(), allow_unsigned=True, allow_expired=True)  # drifted files
    if expires_at is not None:
        if expires_at.tzinfo is None:
            raise ManifestError("expires_at needs a time zone")
        (root / SIGNATURE_FILE).unlink(missing_ok=True)
        updated = pack.manifest.model_copy(update={"expires_at": expires_at.replace(microsecond=0)})
        _write_atomic(root / MANIFEST_FILE, updated.to_bytes())
    data = (root / MANIFEST_FILE).read_bytes()
    _write_atomic(root / SIGNATURE_FILE, sign(data, private))
    return root / SIGNATURE_FILE


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
