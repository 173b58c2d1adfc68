"""The ed25519 check, in a process of its own: ``python -I signature_child.py``.

``modelpack.signing`` runs it when a process must not hold cryptography (the edge agent). It
reads one JSON request on stdin, ``{"data": b64, "signature": b64, "keys": [hex, ...]}``, and
prints the index of the first key that made the signature, or -1. It opens no file: what it
vouches for is the bytes it was handed. It imports nothing of edgebento, so it runs the same
under ``-I`` whatever the caller's ``PYTHONPATH``; any malformed request exits non-zero, which
the caller takes as a refusal.
"""

from __future__ import annotations

import base64
import json
import sys


def matching_key(request: bytes) -> int:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    doc = json.loads(request)
    data = base64.b64decode(doc["data"], validate=True)
    signature = base64.b64decode(doc["signature"], validate=True)
    for index, raw in enumerate(doc["keys"]):
        try:
            Ed25519PublicKey.from_public_bytes(bytes.fromhex(raw)).verify(signature, data)
        except InvalidSignature:
            continue
        return index
    return -1


if __name__ == "__main__":
    print(matching_key(sys.stdin.buffer.read()))
