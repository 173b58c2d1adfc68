"""Loading a pack: every check runs before ONNX Runtime (or onnx) parses a byte of the model."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from modelpack.errors import (
    ExpiredError,
    IntegrityError,
    LayoutError,
    ManifestError,
    ModelInvalidError,
    SignatureError,
    SizeLimitError,
)
from modelpack.hashing import sha256_bytes, sha256_file
from modelpack.manifest import MANIFEST_FILE, MODEL_FILE, SIGNATURE_FILE, Manifest
from modelpack.pack import Pack
from modelpack.signing import TrustedKey, trusted_keys, verify


@dataclass(frozen=True)
class Limits:
    max_manifest_bytes: int = 1 << 20
    max_pack_bytes: int = 4 << 30
    max_files: int = 256


DEFAULT_LIMITS = Limits()


def _read_small(path: Path, cap: int, what: str) -> bytes:
    try:
        info = path.lstat()
    except FileNotFoundError as exc:
        raise (SignatureError if what == SIGNATURE_FILE else ManifestError)(
            f"{what} is missing from {path.parent}"
            + (": the pack is not signed" if what == SIGNATURE_FILE else "")
        ) from exc
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISREG(info.st_mode):
        raise LayoutError(f"{what} is not a regular file")
    if info.st_size > cap:
        raise SizeLimitError(f"{what} is {info.st_size} bytes; the cap is {cap}")
    return path.read_bytes()


def _walk(root: Path, limits: Limits) -> set[str]:
    """Relative paths of every regular file; refuses links, devices and too many files."""
    found: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise LayoutError(f"{rel} is a symlink; packs hold regular files only")
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise LayoutError(f"{rel} is not a regular file")
            found.add(rel)
            if len(found) > limits.max_files:
                raise SizeLimitError(f"the pack holds more than {limits.max_files} files")
    return found


def _check_files(root: Path, manifest: Manifest, limits: Limits) -> None:
    present = _walk(root, limits) - {MANIFEST_FILE, SIGNATURE_FILE}
    listed = {f.path for f in manifest.files}
    unlisted = sorted(present - listed)
    if unlisted:
        raise LayoutError(f"{unlisted[0]} is in the pack but not listed in the manifest")
    missing = sorted(listed - present)
    if missing:
        raise IntegrityError(f"{missing[0]} is listed in the manifest but missing")
    total = sum(f.size for f in manifest.files)
    if total > limits.max_pack_bytes:
        raise SizeLimitError(f"the pack is {total} bytes; the cap is {limits.max_pack_bytes}")
    for entry in manifest.files:
        path = root / entry.path
        if not path.resolve().is_relative_to(root.resolve()):
            raise LayoutError(f"{entry.path} escapes the pack")
        size = path.stat().st_size
        if size != entry.size:
            raise IntegrityError(f"{entry.path} is {size} bytes; the manifest says {entry.size}")
        if sha256_file(path) != entry.sha256:
            raise IntegrityError(f"{entry.path} does not match its sha256 in the manifest")


def _check_external_data(root: Path, manifest: Manifest) -> None:
    """ONNX external data must point at files inside the pack that the manifest lists."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    try:
        model = onnx.load_model(str(root / MODEL_FILE), load_external_data=False)
    except Exception as exc:
        raise ModelInvalidError(f"{MODEL_FILE} is not a readable ONNX model: {exc}") from exc
    listed = {f.path for f in manifest.files}
    for tensor in _get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (root / location).resolve()
        if (
            not location
            or os.path.isabs(location)
            or not target.is_relative_to(root.resolve())
            or target.relative_to(root.resolve()).as_posix() not in listed
        ):
            raise LayoutError(
                f"tensor {tensor.name} keeps its data at {location!r}, outside the pack's listed files"
            )


def _check_model(root: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(root / MODEL_FILE))
    except Exception as exc:  # onnx raises ValidationError and protobuf errors
        raise ModelInvalidError(f"{MODEL_FILE} fails onnx.checker: {exc}") from exc


def _onnx_available() -> bool:
    try:
        import onnx  # noqa: F401
    except ImportError:
        return False
    return True


def load_pack(
    root: Path | str,
    trusted: Iterable[Path | str | TrustedKey],
    *,
    allow_unsigned: bool = False,
    allow_expired: bool = False,
    check_model: bool | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Pack:
    """Verify a pack directory and return it.

    The signature is checked over the raw manifest bytes before the JSON is parsed; the files
    are checked against the manifest before the model is parsed. ``check_model`` runs
    onnx.checker and the external-data check; by default it runs where the onnx package is
    installed (devices without it rely on the signature: the publisher ran the checker).
    """
    root = Path(root)
    if root.is_symlink() or not root.is_dir():
        raise LayoutError(f"{root} is not a pack directory")
    data = _read_small(root / MANIFEST_FILE, limits.max_manifest_bytes, MANIFEST_FILE)
    keys = trusted_keys(trusted)
    signed_by: str | None = None
    if not (allow_unsigned and (not keys or not (root / SIGNATURE_FILE).exists())):
        signature = _read_small(root / SIGNATURE_FILE, 4096, SIGNATURE_FILE)
        signed_by = verify(data, signature, keys).key_id
    manifest = Manifest.from_bytes(data)
    if manifest.expired and not allow_expired:
        raise ExpiredError(
            f"pack {manifest.name} v{manifest.version} expired at {manifest.expires_at}"
        )
    _check_files(root, manifest, limits)
    if check_model is None:
        check_model = _onnx_available()
    if check_model:
        _check_external_data(root, manifest)
        _check_model(root)
    return Pack(
        root=root, manifest=manifest, manifest_sha256=sha256_bytes(data), signed_by=signed_by
    )
