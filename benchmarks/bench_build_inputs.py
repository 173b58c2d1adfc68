"""Peak RSS of reading a zip-bomb ``.npz`` as ``edgebento optimize`` does, beside the old way.

The issue's baseline: every array decompressed, twice (``np.load`` for the export's example,
then again for the data), including arrays the model never takes. Now: the arrays the model takes,
once, each checked against the cap before it is allocated. Each reader runs in a fresh process
that reports its own peak RSS, on the same file, in the same run.

The files are written once; then ``EDGEBENTO_BENCH_RUNS`` rounds (3 by default) run the three
readers, in an order that rotates each round (the first reader of a round may find the file out
of the page cache, and RSS does not count the page cache, but its time does). Each figure is the
median of its rounds with its range; the targets are judged on the medians.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.runs import load, median_of, summarize
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


def _rounds() -> int:
    return max(1, int(os.environ.get("EDGEBENTO_BENCH_RUNS", "3")))


READERS = ("baseline_old_reader", "new_reader", "over_the_cap")


def run(results_dir: Path) -> dict[str, Any]:
    per_round: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        bomb = tmp / "bomb.npz"
        write_npz_bomb(bomb, {"x": CHUNKS} | {f"unused{i}": CHUNKS for i in range(UNUSED)}, "<f4")
        over = tmp / "over.npz"
        write_npz_bomb(over, {"x": 62}, "<f4")  # 3.9 GiB claimed by the model's input
        plans = {
            "baseline_old_reader": (OLD, bomb),
            "new_reader": (NEW, bomb),
            "over_the_cap": (NEW, over),
        }
        for r in range(_rounds()):
            order = [READERS[(r + i) % len(READERS)] for i in range(len(READERS))]
            one: dict[str, Any] = {"order": order, "load_before": load()}
            for reader in order:
                one[reader] = _peak(*plans[reader], tmp)
            per_round.append(one)
        sizes = {
            "bomb_file_kib": bomb.stat().st_size / 1024,
            "over_file_kib": over.stat().st_size / 1024,
        }
    figures = {reader: summarize([r[reader] for r in per_round], 1) for reader in READERS}
    old, new, refused = (median_of(figures[k]["rss_mib"]) for k in READERS)
    said = figures["over_the_cap"]["said"]  # the same words each round, else one per round
    targets = {
        "unused_arrays_never_read": new < old / 3,
        "over_the_cap_refused_small": all(
            s.startswith("refused:") for s in (said if isinstance(said, list) else [said])
        )
        and refused < 400,
    }
    n = len(per_round)
    return {
        "headline": (
            f"bomb ({sizes['bomb_file_kib']:.0f} KiB, 1 GiB of arrays, 256 MiB used): peak RSS"
            f" {new:.0f} MiB vs {old:.0f} MiB before;"
            f" 3.9 GiB claimed: refused at {refused:.0f} MiB (medians of {n} runs)"
        ),
        "runs": n,
        **figures,
        **sizes,
        "targets_met": all(targets.values()),
        "targets": targets,
        "per_round": [
            {
                "round": i + 1,
                "order": " ".join(r["order"]),
                "load_1m": r["load_before"]["load_1m"],
                **{k: round(r[k]["rss_mib"], 1) for k in READERS},
            }
            for i, r in enumerate(per_round)
        ],
        "note": (
            "peak RSS (VmHWM) of a fresh process per reader and round; the readers rotate each "
            "round; targets judged on the medians"
        ),
    }
