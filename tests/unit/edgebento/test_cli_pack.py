"""The pack verbs as a user runs them: real processes, exit codes and one-line reasons."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support import models


def edgebento(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgebento", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_keygen_create_sign_verify_inspect(tmp_path: Path) -> None:
    model = models.mlp(tmp_path / "m.onnx")
    inputs, outputs = models.golden_samples(model)
    import numpy as np

    np.savez(
        tmp_path / "golden.npz", **{"inputs/x": inputs["x"], "outputs/probs": outputs["probs"]}
    )

    assert edgebento("keygen", "--out", tmp_path / "keys").returncode == 0
    assert (tmp_path / "keys" / "signing.key").stat().st_mode & 0o777 == 0o600

    created = edgebento(
        "pack",
        "create",
        model,
        "--name",
        "digits",
        "--version",
        "3",
        "--out",
        tmp_path / "p",
        "--samples",
        tmp_path / "golden.npz",
    )
    assert created.returncode == 0, created.stderr
    assert "unsigned" in created.stdout

    unsigned = edgebento(
        "pack", "verify", tmp_path / "p", "--pub", tmp_path / "keys" / "signing.pub"
    )
    assert unsigned.returncode == 1
    assert unsigned.stderr.strip().startswith("error: manifest.sig is missing")
    assert len(unsigned.stderr.strip().splitlines()) == 1

    assert (
        edgebento(
            "pack", "sign", tmp_path / "p", "--key", tmp_path / "keys" / "signing.key"
        ).returncode
        == 0
    )
    verified = edgebento(
        "pack", "verify", tmp_path / "p", "--pub", tmp_path / "keys" / "signing.pub"
    )
    assert verified.returncode == 0, verified.stderr
    assert "ok: digits v3, 2 files" in verified.stdout

    table = edgebento("pack", "inspect", tmp_path / "p")
    assert table.returncode == 0
    assert (
        "digits v3" in table.stdout
        and "[batch, 8]" in table.stdout
        and "samples.npz" in table.stdout
    )

    doc = json.loads(edgebento("pack", "inspect", tmp_path / "p", "--json").stdout)
    assert doc["name"] == "digits" and doc["version"] == 3 and doc["schema_version"] == 1

    (tmp_path / "p" / "model.onnx").write_bytes(b"tampered")
    tampered = edgebento(
        "pack", "verify", tmp_path / "p", "--pub", tmp_path / "keys" / "signing.pub"
    )
    assert tampered.returncode == 1
    assert tampered.stderr.startswith("error: model.onnx is 8 bytes; the manifest says")


def test_keygen_never_overwrites_a_key(tmp_path: Path) -> None:
    assert edgebento("keygen", "--out", tmp_path).returncode == 0
    again = edgebento("keygen", "--out", tmp_path)
    assert again.returncode == 1
    assert "refusing to overwrite" in again.stderr


def test_expires_in_on_create_and_sign_is_signed_and_enforced(tmp_path: Path) -> None:
    """On main no CLI path set ``expires_at``: a pack could not be made to freeze."""
    import time

    model = models.mlp(tmp_path / "m.onnx")
    assert edgebento("keygen", "--out", tmp_path / "keys").returncode == 0
    key, pub = tmp_path / "keys" / "signing.key", tmp_path / "keys" / "signing.pub"
    made = edgebento("pack", "create", model, "--name", "m", "--version", "1",
                     "--out", tmp_path / "p", "--key", key, "--expires-in", "1h")  # fmt: skip
    assert made.returncode == 0 and "expires 20" in made.stdout, made.stderr
    assert edgebento("pack", "verify", tmp_path / "p", "--pub", pub).returncode == 0
    # Expiring soon is signed by `pack sign` (no race with how long a process takes to start:
    # only the wait after it must pass the expiry).
    soon = edgebento("pack", "sign", tmp_path / "p", "--key", key, "--expires-in", "1s")
    assert soon.returncode == 0, soon.stderr
    time.sleep(1.5)
    expired = edgebento("pack", "verify", tmp_path / "p", "--pub", pub)
    assert expired.returncode == 1 and "expired at" in expired.stderr
    resigned = edgebento("pack", "sign", tmp_path / "p", "--key", key, "--expires-in", "30d")
    assert resigned.returncode == 0, resigned.stderr
    assert edgebento("pack", "verify", tmp_path / "p", "--pub", pub).returncode == 0
    doc = json.loads(edgebento("pack", "inspect", tmp_path / "p", "--json").stdout)
    assert doc["expires_at"] > doc["created_at"]
    bad = edgebento("pack", "sign", tmp_path / "p", "--key", key, "--expires-in", "soon")
    assert bad.returncode == 2 and "not a duration" in bad.stderr
