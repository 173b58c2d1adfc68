"""Store documents the controller signed: what it reads back is a basis for signing only if so.

Import path and API::

    from cloud_sync.sealed import seal, seal_json, unseal
    body = seal({"id": "r1", ...}, private_key)            # JSON bytes with a "signature" field
    body = seal_json(model.model_dump_json().encode(), private_key)   # the same, from JSON bytes
    doc = unseal(body, public_key, "rollouts/r1.json")     # the dict, or SignatureError

A rollout's header, its wave documents and the fleet's groups are written by the controller (or
an operator) holding the signing key, and read back from a bucket that others may be able to
write. A document that was changed, or never signed, or signed by another key, is refused with
a one-line reason: resuming from it would make the operator's key sign what a bucket writer
chose (issue 19, finding 4). A signature binds what a document holds, not when it was written:
an older document the key signed verifies still, so a rollout's waves also carry their save's
sequence, which the header records (``cloud_sync.rollout_store.check_sequence``), and the
controller keeps the header's last sequence outside the bucket (``cloud_sync.rollout_record``).

The signature is ed25519 over the exact bytes of a JSON object, stored with the signature added
as its last field (``{...,"signature":{"key":...,"ed25519":...}}``), so the file stays plain
JSON that people and tools read. Signing the bytes as serialized lets a wave of thousands of
devices be written by pydantic's Rust serializer in one call, with no Python dict per device
(whose allocations also set off the garbage collector inside saves: 70-110 ms of CPU in a
controller holding 5,000 devices' statuses); a dict is sealed as its canonical JSON (sorted
keys, no spaces). Documents stored before were signed over that canonical JSON of what they
hold and written indented; they verify by that rule still.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import TYPE_CHECKING, Any

from modelpack import untrusted_json
from modelpack.errors import SignatureError, StoreError
from modelpack.signing import TrustedKey, key_id

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

FIELD = "signature"


def _canonical(doc: dict[str, Any]) -> bytes:
    body = {k: v for k, v in doc.items() if k != FIELD}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def seal(doc: dict[str, Any], signer: Ed25519PrivateKey) -> bytes:
    """``doc`` as canonical JSON with ``"signature": {"key", "ed25519"}`` by ``signer`` last."""
    return seal_json(_canonical(doc), signer)


def seal_json(body: bytes, signer: Ed25519PrivateKey) -> bytes:
    """``body``, the JSON of an object without a ``signature`` field, with the signature of
    these exact bytes by ``signer`` appended as its last field."""
    if not (body.startswith(b"{") and body.endswith(b"}")):
        raise ValueError("only a JSON object can be sealed")
    mark = {
        "key": key_id(signer.public_key()),
        "ed25519": base64.b64encode(signer.sign(body)).decode(),
    }
    return append_mark(body, mark)


def append_mark(body: bytes, mark: object) -> bytes:
    """``body`` (a JSON object) with ``"signature": mark`` appended as its last field: the
    signed bytes stay as they were, so ``signed_part`` gets them back exactly."""
    field = _field(mark)
    return field if body == b"{}" else body[:-1] + b"," + field[1:]


def _field(mark: object) -> bytes:
    return json.dumps({FIELD: mark}, separators=(",", ":")).encode()


def signed_part(data: bytes, mark: object) -> bytes | None:
    """The bytes that were signed, if ``data`` is laid out as ``append_mark`` writes: the
    object with the signature appended last."""
    field = _field(mark)
    if data == field:
        return b"{}"
    if data.endswith(b"," + field[1:]):
        return data[: len(data) - len(field)] + b"}"
    return None


def public_of(signer: Ed25519PrivateKey) -> TrustedKey:
    public = signer.public_key()
    return TrustedKey(key=public, key_id=key_id(public), source="the controller's --key")


def parse(data: bytes, what: str) -> dict[str, Any]:
    """The JSON object, its signature unchecked (to show, never to act on)."""
    try:
        doc = untrusted_json.loads(data, what)
    except untrusted_json.NotJsonError as exc:
        raise StoreError(str(exc)) from exc
    if not isinstance(doc, dict):
        raise StoreError(f"{what} is not a JSON object")
    return doc


def unseal(data: bytes, trusted: TrustedKey, what: str) -> dict[str, Any]:
    """The document without its signature, if ``trusted`` signed exactly these contents: the
    stored bytes before the signature, or (as stored before) the canonical JSON of the rest."""
    from cryptography.exceptions import InvalidSignature

    doc = parse(data, what)
    mark = doc.get(FIELD)
    if not isinstance(mark, dict) or not isinstance(mark.get("ed25519"), str):
        raise SignatureError(
            f"{what} is not signed by the controller's key: refusing to act on it "
            "(written by someone without the key, or before documents were signed)"
        )
    try:
        signature = base64.b64decode(mark["ed25519"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"{what} carries a signature that is not base64") from exc
    signed = signed_part(data, mark)
    del doc[FIELD]
    # Either layout binds every byte of what is returned: the appended field is all that the
    # signed bytes lack (a key repeated inside them would have been signed too).
    for message in (signed, _canonical(doc)):
        if message is None:
            continue
        try:
            trusted.key.verify(signature, message)
        except InvalidSignature:
            continue
        return doc
    raise SignatureError(
        f"{what} was changed after the controller signed it, or signed by another key than "
        f"{trusted.key_id}: refusing to act on it"
    )
