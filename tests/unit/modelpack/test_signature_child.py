"""Signatures checked in a child process (``verify_out_of_process``, what the edge agent does):
the child's verdict is the in-process one, it holds for exactly the bytes the caller keeps (a
pack changed on the disk after the child looked is refused, never served), and a checker that
cannot start leaves the same check to the caller's process."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelpack import signing
from modelpack.errors import IntegrityError, SignatureError
from modelpack.loader import load_pack
from modelpack.manifest import MANIFEST_FILE, MODEL_FILE
from modelpack.signing import generate_keypair, load_private_key, load_public_key, sign, verify


@pytest.fixture
def in_child() -> Iterator[None]:
    signing.verify_out_of_process()
    try:
        yield
    finally:
        signing.verify_out_of_process(False)


@pytest.fixture(scope="module")
def other_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return generate_keypair(tmp_path_factory.mktemp("other"))


def test_the_child_names_the_key_that_signed(
    in_child: None, keys: tuple[Path, Path], other_key: tuple[Path, Path]
) -> None:
    data = b'{"name": "m", "version": 1}'
    signature = sign(data, load_private_key(keys[0]))
    ours, theirs = load_public_key(keys[1]), load_public_key(other_key[1])
    assert verify(data, signature, [theirs, ours]) == ours
    with pytest.raises(SignatureError, match="does not verify"):
        verify(data + b" ", signature, [theirs, ours])
    with pytest.raises(SignatureError, match="does not verify"):
        verify(data, signature, [theirs])
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    with pytest.raises(SignatureError, match="does not verify"):
        verify(data, flipped, [ours])


def test_the_serving_process_never_imports_cryptography(
    in_child: None, signed_pack: Path, keys: tuple[Path, Path]
) -> None:
    import subprocess
    import sys

    probe = (
        "import sys\nfrom pathlib import Path\nfrom modelpack import signing\n"
        "from modelpack.loader import load_pack\nsigning.verify_out_of_process()\n"
        f"pack = load_pack(Path({str(signed_pack)!r}), [Path({str(keys[1])!r})], check_model=False)\n"
        "print(pack.signed_by)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'cryptography'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[3],
    ).stdout.splitlines()
    assert out == [load_public_key(keys[1]).key_id, "[]"]


def _tamper_after_the_child(monkeypatch: pytest.MonkeyPatch, attack: object) -> None:
    """The attacker writes to the pack at the worst moment: the child has just said yes."""
    real = signing._verify_in_child

    def then_attack(
        data: bytes, signature: bytes, keys: list[signing.TrustedKey]
    ) -> signing.TrustedKey | None:
        found = real(data, signature, keys)
        attack()  # type: ignore[operator]
        return found

    monkeypatch.setattr(signing, "_verify_in_child", then_attack)


def test_a_model_swapped_after_verification_is_refused(
    in_child: None,
    monkeypatch: pytest.MonkeyPatch,
    signed_pack: Path,
    keys: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    evil = tmp_path / "evil.onnx"
    evil.write_bytes((signed_pack / MODEL_FILE).read_bytes()[:-1] + b"\x00")
    _tamper_after_the_child(monkeypatch, lambda: shutil.copyfile(evil, signed_pack / MODEL_FILE))
    with pytest.raises(IntegrityError, match=MODEL_FILE):
        load_pack(signed_pack, [keys[1]], check_model=False)


def test_a_manifest_rewritten_after_verification_is_not_the_one_used(
    in_child: None,
    monkeypatch: pytest.MonkeyPatch,
    signed_pack: Path,
    keys: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    """Manifest and model replaced together, consistent with each other but unsigned: the
    manifest the loader goes on with is the one the child verified, so the new model does not
    match it."""
    import hashlib
    import json

    evil_model = (signed_pack / MODEL_FILE).read_bytes()[:-1] + b"\x00"
    doc = json.loads((signed_pack / MANIFEST_FILE).read_bytes())
    for entry in doc["files"]:
        if entry["path"] == MODEL_FILE:
            entry["sha256"] = hashlib.sha256(evil_model).hexdigest()
            entry["size"] = len(evil_model)

    def attack() -> None:
        (signed_pack / MANIFEST_FILE).write_text(json.dumps(doc))
        (signed_pack / MODEL_FILE).write_bytes(evil_model)

    _tamper_after_the_child(monkeypatch, attack)
    with pytest.raises(IntegrityError, match=MODEL_FILE):
        load_pack(signed_pack, [keys[1]], check_model=False)


def test_a_checker_that_cannot_start_leaves_the_check_to_this_process(
    in_child: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    signed_pack: Path,
    keys: tuple[Path, Path],
    other_key: tuple[Path, Path],
) -> None:
    """No fork, a broken install: the same verdict, from this process (a device must not go
    dark because a child could not start at boot)."""
    monkeypatch.setattr(signing, "_CHILD", signed_pack / "no-such-checker.py")
    assert load_pack(signed_pack, [keys[1]], check_model=False).signed_by is not None
    assert "checking in this process" in caplog.text
    with pytest.raises(SignatureError, match="does not verify"):
        load_pack(signed_pack, [other_key[1]], check_model=False)
