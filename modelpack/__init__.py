"""The ModelPack: the one artifact that moves between every stage of edgebento.

A pack is a directory with ``model.onnx``, ``manifest.json``, ``manifest.sig`` and optionally
``samples.npz`` and ``report.json``. This package owns its format, its signatures, its safe
loading, the tensor JSON codec, the ONNX Runtime ``Predictor`` and the serving core
(``modelpack.serving``) every target uses.
"""

from __future__ import annotations

from modelpack.archive import extract_archive, write_archive
from modelpack.codec import decode_request, encode_response, parse_body
from modelpack.errors import (
    ArchiveError,
    EdgebentoError,
    ExpiredError,
    InferenceError,
    InputError,
    IntegrityError,
    KeyFileError,
    LayoutError,
    ManifestError,
    ModelInvalidError,
    PackError,
    SignatureError,
    SizeLimitError,
    VersionError,
)
from modelpack.hashing import sha256_bytes, sha256_file
from modelpack.loader import Limits, load_pack
from modelpack.manifest import (
    MANIFEST_FILE,
    MODEL_FILE,
    REPORT_FILE,
    SAMPLES_FILE,
    SIGNATURE_FILE,
    FileEntry,
    Manifest,
    SequenceInput,
    TensorSpec,
)
from modelpack.pack import Pack, Samples, read_samples, write_samples
from modelpack.predictor import Predictor, PredictorOptions
from modelpack.signing import TrustedKey, generate_keypair, load_private_key, load_public_key
from modelpack.writer import create_pack, sign_pack

__all__ = [
    "MANIFEST_FILE",
    "MODEL_FILE",
    "REPORT_FILE",
    "SAMPLES_FILE",
    "SIGNATURE_FILE",
    "ArchiveError",
    "EdgebentoError",
    "ExpiredError",
    "FileEntry",
    "InferenceError",
    "InputError",
    "IntegrityError",
    "KeyFileError",
    "LayoutError",
    "Limits",
    "Manifest",
    "ManifestError",
    "ModelInvalidError",
    "Pack",
    "PackError",
    "Predictor",
    "PredictorOptions",
    "Samples",
    "SequenceInput",
    "SignatureError",
    "SizeLimitError",
    "TensorSpec",
    "TrustedKey",
    "VersionError",
    "create_pack",
    "decode_request",
    "encode_response",
    "extract_archive",
    "generate_keypair",
    "load_pack",
    "load_private_key",
    "load_public_key",
    "parse_body",
    "read_samples",
    "sha256_bytes",
    "sha256_file",
    "sign_pack",
    "write_archive",
    "write_samples",
]
