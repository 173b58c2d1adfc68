"""``load_public_key`` reads an ed25519 PEM without cryptography's serialization package (a
device's memory); whatever the text, it must read the same key, or refuse, as the full parser."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelpack.errors import KeyFileError
from modelpack.signing import generate_keypair, load_public_key

REPO = Path(__file__).resolve().parents[3]


def _der(key: ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@st.composite
def pem_texts(draw: st.DrawFn) -> bytes:
    """PEM as tools write it and as people edit it: any line width, CRLF, blank lines around,
    another key type, a flipped or cut DER byte, a wrong label."""
    seed = draw(st.binary(min_size=32, max_size=32))
    if draw(st.booleans()):
        der = _der(ed25519.Ed25519PrivateKey.from_private_bytes(seed).public_key())
    else:
        der = _der(
            ec.derive_private_key(int.from_bytes(seed) % 2**200 + 1, ec.SECP256R1()).public_key()
        )
    change = draw(st.sampled_from(["none", "flip", "cut", "extend"]))
    if change == "flip":
        at = draw(st.integers(0, len(der) - 1))
        der = der[:at] + bytes([der[at] ^ draw(st.integers(1, 255))]) + der[at + 1 :]
    elif change == "cut":
        der = der[: draw(st.integers(0, len(der) - 1))]
    elif change == "extend":
        der += draw(st.binary(min_size=1, max_size=4))
    body = base64.b64encode(der).decode()
    width = draw(st.integers(4, 80))
    lines = [body[i : i + width] for i in range(0, len(body), width)]
    label = draw(st.sampled_from(["PUBLIC KEY", "PUBLIC KEY", "PRIVATE KEY", "RSA PUBLIC KEY"]))
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    text = newline.join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----"])
    return (
        draw(st.sampled_from(["", "\n"])) + text + draw(st.sampled_from(["", "\n", "\n\n"]))
    ).encode()


def _full_parser(pem: bytes) -> bytes | None:
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        return None
    return key.public_bytes_raw()


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(pem=pem_texts())
def test_any_pem_reads_as_the_full_parser_reads_it(pem: bytes, tmp_path: Path) -> None:
    path = tmp_path / "signing.pub"
    path.write_bytes(pem)
    expected = _full_parser(pem)
    try:
        got: bytes | None = load_public_key(path).key.public_bytes_raw()
    except KeyFileError:
        got = None
    assert got == expected


def test_a_device_reads_its_trusted_key_without_the_serialization_package(tmp_path: Path) -> None:
    _, pub = generate_keypair(tmp_path)
    probe = (
        "import sys\nfrom modelpack.signing import load_public_key\n"
        f"print(load_public_key({str(pub)!r}).key_id)\n"
        "print(sorted(m for m in sys.modules if m.startswith('cryptography.hazmat.primitives.serial')"
        " or m.split('.')[0] == 'bcrypt'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout.splitlines()
    assert out[0] == load_public_key(pub).key_id
    # serialization pulls in SSH keys, ciphers and bcrypt: 1.3 MB of a device's 36
    assert out[1] == "[]"
