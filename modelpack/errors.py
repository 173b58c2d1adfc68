"""The one error tree of edgebento.

Every refusal is a typed error whose message says, in one line, what was wrong. Lower-level
exceptions (OSError, cryptography, onnxruntime, boto3, paho) are translated once, at the boundary
where they happen, with ``raise X(...) from exc``.
"""

from __future__ import annotations

from typing import Any


class EdgebentoError(Exception):
    """Base of every error edgebento raises on purpose."""

    def __init__(self, message: str) -> None:
        # One line, always: messages end up in logs, MQTT replies and HTTP bodies.
        super().__init__(" ".join(str(message).split()))

    @property
    def message(self) -> str:
        return str(self)


class ConfigError(EdgebentoError):
    """A setting, file or flag that cannot be used as given."""


# --- the pack --------------------------------------------------------------------------------


class PackError(EdgebentoError):
    """A ModelPack that cannot be created, read or trusted."""


class ManifestError(PackError):
    """manifest.json is missing, is not valid JSON, or does not follow the schema."""


class SignatureError(PackError):
    """manifest.sig is missing, malformed, or not made by a trusted key."""


class IntegrityError(PackError):
    """A file's size or sha256 differs from what the manifest says."""


class LayoutError(PackError):
    """A file the manifest does not list, a symlink, or a path that escapes the pack."""


class SizeLimitError(PackError):
    """A pack, a file or an archive past the configured size cap."""


class ModelInvalidError(PackError):
    """The ONNX model fails onnx.checker or cannot be opened by ONNX Runtime."""


class ExpiredError(PackError):
    """The manifest's expires_at is in the past."""


class VersionError(PackError):
    """A version that is not allowed here (not newer than the installed one, or taken)."""


class ArchiveError(PackError):
    """A pack archive with an unsafe or unreadable member."""


class KeyFileError(PackError):
    """A signing or public key file that cannot be read."""


# --- inference -------------------------------------------------------------------------------


class InputError(EdgebentoError):
    """A request whose tensors do not match the model's io signature.

    ``reason`` is a short machine-readable code (used as a metrics label); the message says
    exactly what was wrong for a person.
    """

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


class InferenceError(EdgebentoError):
    """ONNX Runtime failed on input that passed validation."""


class OverloadError(EdgebentoError):
    """A request refused because the model cannot start it in time: the queue is full or its
    deadline passed while it waited (503 with Retry-After; ``busy`` on MQTT)."""

    def __init__(self, message: str, reason: str = "queue_full", retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s


# --- the cloud and the device ----------------------------------------------------------------


class StoreError(EdgebentoError):
    """An object store operation that failed (S3 or a local directory)."""


class NotFoundError(StoreError):
    """An object, pack or version that is not in the store."""


class ConflictError(StoreError):
    """A conditional write that lost: the object exists already, or changed since it was read."""


class ProtocolError(EdgebentoError):
    """An MQTT message that does not follow the device protocol."""


class BrokerError(EdgebentoError):
    """The MQTT broker cannot be reached or refused us."""


class AuthError(BrokerError):
    """The broker rejected the credentials: retrying will not help."""


# What a message says back of a client's own text (a field name, a command name, a value):
# enough to recognise it, never the whole of it. JSON escapes write a character in up to 12
# bytes, so a bound in characters is a bound in bytes: a 10 KiB field name once made a 30 KiB
# telemetry record of the refusal that named it.
MAX_ECHO_CHARS = 64
MAX_MESSAGE_CHARS = 1024  # a whole message, whatever it quotes
MAX_LOC_PARTS = 6  # of a pydantic error's location (nested keys a client chose)


def clip(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """``text`` when it has at most ``limit`` characters; else its start and its end around
    ``…(+N chars)``, N the characters left out, in at most ``limit`` characters in all (for a
    ``limit`` of at least 24: a marker needs room)."""
    if len(text) <= limit:
        return text
    kept = max(0, limit - len(f"…(+{len(text)} chars)"))  # the widest marker it can need
    head = kept - kept // 3
    tail = kept - head
    return f"{text[:head]}…(+{len(text) - kept} chars){text[len(text) - tail :] if tail else ''}"


def first_problem(exc: Any, whole: str) -> str:
    """``where: what`` of a pydantic ValidationError's first error, for a one-line message.

    ``whole`` names the document when the error is about all of it (no location). The location
    holds names a client chose (an unknown field, a key of its own): each is clipped, and so is
    how deep it goes; the message is pydantic's, which names the expected, not the input.
    """
    first = exc.errors(include_url=False, include_input=False, include_context=False)[0]
    loc = [clip(str(p)) for p in first["loc"]]
    if len(loc) > MAX_LOC_PARTS:
        loc = [*loc[: MAX_LOC_PARTS - 1], f"…(+{len(loc) - MAX_LOC_PARTS + 1} levels)", loc[-1]]
    where = ".".join(loc) or whole
    return f"{where}: {clip(str(first['msg']), MAX_MESSAGE_CHARS // 2)}"
