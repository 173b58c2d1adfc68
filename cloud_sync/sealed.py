"""Store documents the controller signed: what it reads back is a basis for signing only if so.

Import path and API::

    from cloud_sync.sealed import seal, unseal
    body = seal({"id": "r1", ...}, private_key)            # JSON bytes with a "signature" field
    doc = unseal(body, public_key, "rollouts/r1.json")     # the dict, or SignatureError

A rollout's header, its wave documents and the fleet's groups are written by the controller (or
an operator) holding the signing key, and read back from a bucket that others may be able to
write. The signature is ed25519 over the document's canonical JSON (sorted keys, no spaces)
without its ``signature`` field, so the stored file stays plain JSON that people and tools read
as before. A document that was changed, or never signed, or signed by another key, is refused
with a one-line reason: resuming from it would make the operator's key sign what a bucket
writer chose (issue 19, finding 4).

The stored bytes are that canonical JSON itself with the signature appended as its last field:
one pass of the C JSON encoder per document, which a rollout's wave of thousands of devices
saves many times (an indented copy took four times as long and twice the bytes). Verifying
re-canonicalizes what it parsed, so documents stored indented, before, verify the same way.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import TYPE_CHECKING, Any

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
    canonical = _canonical(doc)
    mark = {
        "key": key_id(signer.public_key()),
        "ed25519": base64.b64encode(signer.sign(canonical)).decode(),
    }
    field = json.dumps({FIELD: mark}, separators=(",", ":")).encode()
    # The canonical bytes are a JSON object: the signature goes in before its closing brace.
    return field if canonical == b"{}" else canonical[:-1] + b"," + field[1:]


def public_of(signer: Ed25519PrivateKey) -> TrustedKey:
    public = signer.public_key()
    return TrustedKey(key=public, key_id=key_id(public), source="the controller's --key")


def parse(data: bytes, what: str) -> dict[str, Any]:
    """The JSON object, its signature unchecked (to show, never to act on)."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"{what} is not JSON") from exc
    if not isinstance(doc, dict):
        raise StoreError(f"{what} is not a JSON object")
    return doc


def unseal(data: bytes, trusted: TrustedKey, what: str) -> dict[str, Any]:
    """The document without its signature, if ``trusted`` signed exactly these contents."""
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
        trusted.key.verify(signature, _canonical(doc))
    except (binascii.Error, ValueError, InvalidSignature) as exc:
        raise SignatureError(
            f"{what} was changed after the controller signed it, or signed by another key than "
            f"{trusted.key_id}: refusing to act on it"
        ) from exc
    del doc[FIELD]
    return doc
