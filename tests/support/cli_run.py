"""``python -m edgebento ...`` in its own process, stdout and stderr captured: a pipe, as a user
runs ``edgebento ... | grep`` (no terminal, no ``COLUMNS`` from the test's environment)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    return subprocess.run(
        [sys.executable, "-m", "edgebento", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        env={**env, "PYTHONPATH": str(REPO)},
    )
