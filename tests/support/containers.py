"""Running buildah from the container tests: a command that must succeed, and a container from an
image that is removed afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_checked(cmd: list[str], env: dict[str, str], timeout: float = 900) -> str:
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd[:3])}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done.stdout


@contextmanager
def working_container(image: str, env: dict[str, str]) -> Iterator[str]:
    """``buildah from image``; the container is removed on exit."""
    ctr = run_checked(["buildah", "from", image], env).strip()
    try:
        yield ctr
    finally:
        subprocess.run(["buildah", "rm", ctr], env=env, capture_output=True)


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group ``proc`` leads (``buildah run`` and what runs inside), then KILL."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
