"""``edgebento monitor --metrics-port`` as a real process for the tests: serving the drift
gauges of a store, checking it again every second."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def serve_monitor(store: Path, pack: Path, out: Path, port: int) -> subprocess.Popen[str]:
    """The monitor judging ``store`` against ``pack``'s baseline, its gauges on ``port``; its
    stdout (what it printed at its first check) and stderr are pipes."""
    return subprocess.Popen(
        [sys.executable, "-c", "import sys; from edgebento.cli import main; sys.exit(main())",
         "monitor", "--store", str(store), "--pack", str(pack), "--out", str(out),
         "--metrics-port", str(port), "--every", "1"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
