"""Peak RSS of reading a zip-bomb ``.npz`` as ``edgebento optimize`` does, beside the old way.

The issue's baseline: every array decompressed, twice (``np.load`` for the export's example,
then again for the data), including arrays the model never takes. Now: the arrays the model takes,
once, each checked against the cap before it is allocated. Each reader runs in a fresh process
that reports its own peak RSS, on the same file, in the same run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.serving_common import REPO
from tests.support.zipbomb import write_npz_bomb

CHUNKS = 4  # 256 MiB of float32 zeros per member
UNUSED = 3

# What main had: optimize/pipeline.py's _raw_arrays, then optimize/data.py's load_npz.
OLD = """
import numpy as np, sys
def everything(path):
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
example = {k: v for k, v in everything(sys.argv[1]).items() if k != "labels"}
arrays = everything(sys.argv[1])
"""
NEW = """
import sys
from pathlib import Path
from modelpack import TensorSpec
from optimize.data import load_npz
from optimize.pipeline import _raw_arrays
example = _raw_arrays(Path(sys.argv[1]))
try:
    data = load_npz(Path(sys.argv[1]), [TensorSpec(name="x", dtype="float32", shape=["batch"])])
    print("read", data.inputs["x"].nbytes)
except Exception as exc:
    print("refused:", exc)
"""
# VmHWM: the peak of this process image alone (ru_maxrss would count the parent's at fork).
MEASURE = """
import json, re, sys
sys.argv = sys.argv[1:]
code = sys.argv[0]
exec(compile(open(code).read(), code, "exec"))
peak = re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)
print(json.dumps({"rss_mib": int(peak) / 1024}))
"""


def _peak(script: str, npz: Path, tmp: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    code = tmp / "reader.py"
    code.write_text(script)
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(code), str(npz)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        timeout=600,
        check=True,
    )
    lines = done.stdout.strip().splitlines()
    return {**json.loads(lines[-1]), "said": lines[0] if len(lines) > 1 else ""}


def run(results_dir: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        bomb = tmp / "bomb.npz"
        write_npz_bomb(bomb, {"x": CHUNKS} | {f"unused{i}": CHUNKS for i in range(UNUSED)}, "<f4")
        over = tmp / "over.npz"
        write_npz_bomb(over, {"x": 62}, "<f4")  # 3.9 GiB claimed by the model's input
        old = _peak(OLD, bomb, tmp)
        new = _peak(NEW, bomb, tmp)
        refused = _peak(NEW, over, tmp)
        sizes = {
            "bomb_file_kib": bomb.stat().st_size / 1024,
            "over_file_kib": over.stat().st_size / 1024,
        }
    targets = {
        "unused_arrays_never_read": new["rss_mib"] < old["rss_mib"] / 3,
        "over_the_cap_refused_small": refused["said"].startswith("refused:")
        and refused["rss_mib"] < 400,
    }
    return {
        "headline": (
            f"bomb ({sizes['bomb_file_kib']:.0f} KiB, 1 GiB of arrays, 256 MiB used): peak RSS"
            f" {new['rss_mib']:.0f} MiB vs {old['rss_mib']:.0f} MiB before;"
            f" 3.9 GiB claimed: refused at {refused['rss_mib']:.0f} MiB"
        ),
        "baseline_old_reader": old,
        "new_reader": new,
        "over_the_cap": refused,
        **sizes,
        "targets_met": all(targets.values()),
        "targets": targets,
        "note": "peak RSS of fresh processes on a machine shared with other work; noisy",
    }
