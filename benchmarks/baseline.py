"""Today's design, to measure beside the new one in the same run: the source tree of the commit
before end-to-end acknowledgements, unpacked from git into a temporary directory. Processes
started with ``PYTHONPATH`` set to it run that code (same venv, same machine, same moment)."""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# main before issue 11: records left the outbox on the broker's PUBACK.
PUBACK_COMMIT = "40c205d462937e63dbcca19a0e56c9386643742d"


def baseline_tree(work: Path, commit: str = PUBACK_COMMIT) -> Path:
    out = work / f"baseline-{commit[:8]}"
    if out.exists():
        return out
    out.mkdir(parents=True)
    archive = work / f"{commit[:8]}.tar"
    with archive.open("wb") as fh:
        subprocess.run(["git", "-C", str(REPO), "archive", commit], stdout=fh, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(out, filter="data")
    return out
