"""Issue 19, finding 11: values that cannot work stop the agent and the CLI at start, with one
``error:`` line naming the flag, before anything connects (real ``edge-agent`` and ``edgebento``
processes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.agent import REPO

pytestmark = pytest.mark.slow


def _run(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True, text=True, cwd=REPO, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO), "EDGEBENTO_LOG_FORMAT": "text"},
    )  # fmt: skip


def _one_error(done: subprocess.CompletedProcess[str], *says: str) -> None:
    assert done.returncode != 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert all(s in lines[0] for s in says), lines[0]


@pytest.mark.parametrize(
    ("broker", "says"),
    [
        ("mqtt://127.0.0.1:99999", "is not 1-65535"),
        ("mqtt://127.0.0.1:0", "port 0"),
        ("mqtts://user:Secr3t!@127.0.0.1:70000", "is not 1-65535"),
    ],
)
def test_an_agent_with_a_broker_port_that_cannot_work_stops_at_start(
    tmp_path: Path, keys: tuple[Path, Path], broker: str, says: str
) -> None:
    done = _run(
        "edge_agent", "run", "--device", "dev-a", "--broker", broker, "--data-dir",
        str(tmp_path / "data"), "--trust", str(keys[1]),
    )  # fmt: skip
    _one_error(done, "--broker", says)
    assert "Secr3t" not in done.stderr


def test_an_agent_whose_trust_file_cannot_be_a_key_stops_at_start(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    not_a_key = tmp_path / "notes.pub"
    not_a_key.write_text("-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n")
    private = keys[0]  # the signing key where the public one belongs
    for trust, says in (
        (tmp_path / "missing.pub", "No such file"),
        (not_a_key, "cannot read public key"),
        (private, "cannot read public key"),
        (tmp_path, "cannot read public key"),  # a directory
    ):
        done = _run(
            "edge_agent", "run", "--device", "dev-a", "--data-dir", str(tmp_path / "data"),
            "--trust", str(keys[1]), "--trust", str(trust), "--log-format", "text",
        )  # fmt: skip
        _one_error(done, f"--trust {trust}", says)
    assert not (tmp_path / "data").exists()  # stopped before it made anything


def test_a_rollout_whose_timeout_cannot_hold_one_wave_stops_at_start(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    base = ["rollout", "tiny", "2", "--store", str(tmp_path / "store"), "--devices", "a"]
    base += ["--key", str(keys[0])]
    # Port 1: nothing listens; the refusal must come before any connection is tried.
    done = _run("edgebento", *base, "--broker", "mqtt://127.0.0.1:1", "--timeout", "90")
    _one_error(done, "--timeout 90", "--wave-timeout 300 + --bake 60 = 360s")
    shorter = ["--timeout", "90", "--wave-timeout", "20", "--bake", "80"]
    done = _run("edgebento", *base, "--broker", "mqtt://127.0.0.1:1", *shorter)
    _one_error(done, "--timeout 90", "= 100s")
    done = _run("edgebento", *base, "--broker", "mqtt://127.0.0.1:99999")
    _one_error(done, "--broker", "is not 1-65535")
    assert not (tmp_path / "store").exists()
