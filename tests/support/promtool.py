"""``promtool check metrics`` on a /metrics page: every target's metrics must pass it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def promtool() -> str:
    found = shutil.which("promtool") or str(Path(sys.executable).parent / "promtool")
    if not Path(found).exists():
        pytest.fail("promtool is missing: run 'make container-tools' (make test does)")
    return found


def assert_promtool_passes(text: str) -> None:
    check = subprocess.run(
        [promtool(), "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
