"""manifest.json, schema version 1: what a pack holds and what its model takes and gives."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from modelpack.errors import ManifestError, first_problem
from modelpack.untrusted_json import NotJsonError
from modelpack.untrusted_json import loads as load_json

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
MODEL_FILE = "model.onnx"
SAMPLES_FILE = "samples.npz"
REPORT_FILE = "report.json"
BASELINE_FILE = "baseline.json"  # modelpack.baseline's, named here so a reader need not import it

# ONNX element types a manifest may name, as numpy dtype names.
DTYPES = (
    "float32",
    "float16",
    "float64",
    "int8",
    "uint8",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "bool",
    "string",
)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

Dim = int | str | None
"""A fixed size, a symbolic name (``batch``), or None for an unnamed dynamic dim."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TensorSpec(_Frozen):
    name: str
    dtype: str
    shape: list[Dim] | None = None  # None: rank unknown

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value not in DTYPES:
            raise ValueError(f"unknown dtype {value!r}")
        return value

    @property
    def batch_dynamic(self) -> bool:
        """True when the first dim takes any size (what adaptive batching needs)."""
        return bool(self.shape) and not isinstance(self.shape[0], int)  # type: ignore[index]


class FileEntry(_Frozen):
    path: str
    sha256: str
    size: int = Field(ge=0)

    @field_validator("path")
    @classmethod
    def _relative(cls, value: str) -> str:
        parts = value.split("/")
        if (
            not value
            or value.startswith("/")
            or "\\" in value
            or any(p in ("", ".", "..") for p in parts)
            or value in (MANIFEST_FILE, SIGNATURE_FILE)
        ):
            raise ValueError(f"unsafe file path {value!r}")
        return value

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        if not _SHA256.match(value):
            raise ValueError("sha256 must be 64 lowercase hex digits")
        return value


class SequenceInput(_Frozen):
    """An input whose ``axis`` holds a variable-length sequence (tokens, frames)."""

    input: str
    axis: int = 1
    pad_value: float = 0
    mask_input: str | None = None  # the attention mask, padded with 0
    outputs: list[str] = Field(default_factory=list)  # outputs cut back along the same axis


class Manifest(_Frozen):
    schema_version: Literal[1] = 1
    name: str
    version: int = Field(gt=0)
    created_at: datetime
    expires_at: datetime | None = None
    files: list[FileEntry]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    labels: list[str] = Field(default_factory=list)
    optimization: dict[str, Any] = Field(default_factory=dict)
    parent: str | None = None  # sha256 of the source model
    sequence: list[SequenceInput] = Field(default_factory=list)
    metadata: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(
                "name must be 1-128 of A-Z a-z 0-9 . _ - and start with a letter or digit"
            )
        return value

    @field_validator("created_at", "expires_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value

    @field_validator("files")
    @classmethod
    def _unique_paths(cls, value: list[FileEntry]) -> list[FileEntry]:
        paths = [f.path for f in value]
        if len(set(paths)) != len(paths):
            raise ValueError("a file is listed twice")
        if MODEL_FILE not in paths:
            raise ValueError(f"{MODEL_FILE} is not listed")
        return value

    def file(self, path: str) -> FileEntry | None:
        return next((f for f in self.files if f.path == path), None)

    @property
    def expired(self) -> bool:
        return self.expires_at is not None and self.expires_at <= datetime.now(UTC)

    @property
    def model_ref(self) -> dict[str, Any]:
        """What every answer carries about the model: ``{"name", "version"}``."""
        return {"name": self.name, "version": self.version}

    def to_bytes(self) -> bytes:
        """The exact bytes that are written, hashed and signed."""
        return (json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        try:
            raw = load_json(data, "manifest.json")
        except NotJsonError as exc:
            raise ManifestError(str(exc)) from exc
        if not isinstance(raw, dict):
            raise ManifestError("manifest.json must hold a JSON object")
        if raw.get("schema_version") != SCHEMA_VERSION:
            raise ManifestError(
                f"manifest schema_version {raw.get('schema_version')!r} is not supported "
                f"(this edgebento reads {SCHEMA_VERSION})"
            )
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise ManifestError(f"manifest.json: {first_problem(exc, 'manifest')}") from exc
