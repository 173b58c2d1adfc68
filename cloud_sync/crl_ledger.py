"""The CRL's ledger: each listed certificate's notAfter and each revoked device with the time of
its revocation, in one non-critical extension of the CRL, signed by the CA with the rest
(``cloud_sync.crl_disk`` says why it is there).

Import path and API::

    from cloud_sync.crl_ledger import LEDGER, ledger_extension, read_ledger
    ext = ledger_extension({serial: not_after}, {"cam-3": revoked_at})   # ConfigError if unfit
    not_after, devices = read_ledger(crl)     # a CRL the CA signed; ConfigError if unreadable

The ledger is JSON in a UTF8String. It is read only from a CRL whose signature was checked on
the very object it is read from, but a writer of the CRL on disk is trusted only as far as its
signature goes, and one bad CRL must never crash a writer or the enrollment service: the
document is parsed by ``modelpack.untrusted_json`` (no NaN or Infinity, no integer past
Python's digit limit, no nesting past the stack) and then by a strict model: version 1, serials
in lower-case hex within RFC 5280's 1 to 20 octets, device ids as a device id is spelled
(``cloud_sync.rollout_state.DEVICE_ID``: no path, no escape), finite times from 1970 to 9999,
at most ``MAX_ENTRIES`` of each. Anything else is a ``ConfigError`` naming what is wrong, which
every reader of the CRL on disk already turns into a refusal. The writer checks what it signs
against the same model, so no CRL is written that its own reader would refuse.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from cloud_sync.rollout_state import DEVICE_ID
from modelpack.errors import ConfigError, clip, first_problem
from modelpack.untrusted_json import NotJsonError, loads

# 2.25.{UUID} (ITU-T X.667): an OID of edgebento's own, no registry needed.
LEDGER = "2.25.259284619126166953979274007328769758746"
MAX_ENTRIES = 1_000_000  # of each: far past a fleet's CRL (Mosquitto took 100k entries)
LATEST = 253402300799.0  # 9999-12-31T23:59:59Z, the last second a datetime holds
_UTF8STRING = 0x0C

HexSerial = Annotated[str, StringConstraints(pattern=r"\A[1-9a-f][0-9a-f]{0,39}\z")]
DeviceId = Annotated[str, StringConstraints(pattern=rf"\A{DEVICE_ID.pattern}\z")]
Time = Annotated[float, Field(ge=0, le=LATEST, allow_inf_nan=False)]


class LedgerDoc(BaseModel):
    """The ledger as it is written: ``{"v": 1, "not_after": {hex: t}, "devices": {id: t}}``."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    v: Literal[1]
    not_after: dict[HexSerial, Time] = Field(max_length=MAX_ENTRIES)
    devices: dict[DeviceId, Time] = Field(max_length=MAX_ENTRIES)


def _der_utf8(text: str) -> bytes:
    body = text.encode()
    if len(body) < 0x80:
        return bytes([_UTF8STRING, len(body)]) + body
    size = len(body).to_bytes((len(body).bit_length() + 7) // 8, "big")
    return bytes([_UTF8STRING, 0x80 | len(size)]) + size + body


def _from_der_utf8(data: bytes) -> str:
    if len(data) < 2 or data[0] != _UTF8STRING:
        raise ValueError("not a UTF8String")
    size, at = data[1], 2
    if size & 0x80:
        at = 2 + (size & 0x7F)
        size = int.from_bytes(data[2:at], "big")
    if len(data) != at + size:
        raise ValueError("the UTF8String's length is wrong")
    return data[at:].decode()


def _reason(exc: ValidationError) -> str:
    """The first problem in one printable line: a key is the CRL writer's text (``\x1b[2J``)."""
    text = first_problem(exc, "the ledger")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _doc(doc: Any) -> LedgerDoc:
    try:
        return LedgerDoc.model_validate(doc)
    except ValidationError as exc:
        raise ConfigError(
            f"the CRL's ledger is not one this release writes ({exc.error_count()} "
            f"problems, first {_reason(exc)})"
        ) from exc


def ledger_extension(not_after: Mapping[int, float], devices: Mapping[str, float]) -> Any:
    """The ledger as an X.509 extension; ConfigError if it holds what no reader would take (a
    serial out of range, a device id that is none, a time that is not one), before it is
    signed into a CRL that every later write would then refuse."""
    from cryptography import x509

    doc = {
        "v": 1,
        # Rounded up (whole seconds, milliseconds): never an entry dropped, nor a claim let
        # through, early.
        "not_after": {format(s, "x"): _up(t, 1) for s, t in sorted(not_after.items())},
        "devices": {d: _up(t, 1000) for d, t in sorted(devices.items())},
    }
    _doc(doc)
    text = json.dumps(doc, separators=(",", ":"))
    return x509.UnrecognizedExtension(x509.ObjectIdentifier(LEDGER), _der_utf8(text))


def _up(t: float, per_second: int) -> float:
    if not math.isfinite(t):
        return t  # refused by the model, with its name
    up = math.ceil(t * per_second)
    return up // per_second if per_second == 1 else up / per_second


def read_ledger(crl: Any) -> tuple[dict[int, float], dict[str, float]]:
    """The ledger of ``crl`` (a CRL object whose signature the caller checked): serial ->
    notAfter, device -> revocation time; both empty for a CRL from before the ledger."""
    from cryptography import x509

    try:
        ext = crl.extensions.get_extension_for_oid(x509.ObjectIdentifier(LEDGER))
    except x509.ExtensionNotFound:
        return {}, {}  # a CRL from before the ledger
    except ValueError as exc:  # a duplicate or malformed extension
        raise ConfigError(f"the CRL's extensions cannot be read ({clip(str(exc))})") from exc
    raw = getattr(ext.value, "value", None)
    try:
        text = _from_der_utf8(raw if isinstance(raw, bytes) else b"")
        doc = _doc(loads(text, "the CRL's ledger", finite=True))
    except NotJsonError as exc:
        raise ConfigError(str(exc)) from exc
    except ValueError as exc:  # not a UTF8String, or not UTF-8
        raise ConfigError(f"the CRL's ledger cannot be read ({clip(str(exc))})") from exc
    until = {int(s, 16): t for s, t in doc.not_after.items()}
    return until, dict(doc.devices)
