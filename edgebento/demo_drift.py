"""The demo's drift step: two cohorts of the cloud's registry of groups, dev-2's camera turns
darker, and ``edgebento monitor`` finds that cohort's drift from the devices' summaries (carried
by dev-2 alone: named, never a fleet alarm by one device) while dev-1's cohort stays ok."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from edgebento.demo_fleet import Fleet, reply_topic
from edgebento.demo_runner import BIN, Demo, console

WINDOW_S = "5"  # EDGEBENTO_DRIFT_WINDOW_S of the demo's agents: windows short enough to watch
ROWS, RATE, SECONDS = 8, 25, 12.0


def _traffic(fleet: Fleet, device: str, calib: Path, dim: float) -> subprocess.Popen[str]:
    """Requests of 8 rows drawn from the baseline's own data (times ``dim``), one per line into
    ``mosquitto_pub -l``."""
    import numpy as np

    x = np.load(calib)["x"]
    rng = np.random.default_rng(len(device))
    argv = ["mosquitto_pub", *fleet.mosquitto_args(), "-q", "1",
            "-t", f"edgebento/{device}/infer", "-l"]  # fmt: skip
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, text=True, stderr=subprocess.DEVNULL)
    assert proc.stdin is not None
    for i in range(int(RATE * SECONDS)):
        rows = (x[rng.integers(0, len(x), ROWS)] * dim).round(4).tolist()
        line = {"id": f"drift-{i}", "inputs": {"x": rows}, "reply_to": reply_topic(device, "drift")}
        proc.stdin.write(json.dumps(line) + "\n")
        proc.stdin.flush()
        time.sleep(1 / RATE)
    return proc


def step_drift(demo: Demo, fleet: Fleet, calib: Path) -> str:
    store = fleet.store
    demo.run(BIN / "edgebento", "fleet", "group", "add", "lobby", "dev-1", "--store", store)
    demo.run(BIN / "edgebento", "fleet", "group", "add", "dock", "dev-2", "--store", store)
    console.print(
        f"[dim]dev-1 sees images like the baseline's, dev-2's camera is 60 % darker: "
        f"{RATE} requests/s of {ROWS} rows each for {SECONDS:.0f} s[/dim]"
    )
    import threading

    procs: list[subprocess.Popen[str]] = []
    threads = [
        threading.Thread(target=lambda d=d, k=k: procs.append(_traffic(fleet, d, calib, k)))
        for d, k in (("dev-1", 1.0), ("dev-2", 0.4))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for proc in procs:
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait(timeout=30)
    time.sleep(float(WINDOW_S) + 3)  # the last window closes, is sent, stored and acknowledged
    out = demo.workdir / "drift"
    demo.run(
        BIN / "edgebento", "monitor", "--store", store, "--model", "digits", "--version", "2",
        "--trust", fleet.keys / "signing.pub", "--out", out, "--min-samples", "100",
    )  # fmt: skip
    doc = json.loads((out / "drift.json").read_text())
    by = {c["cohort"]: c for c in doc["cohorts"]}
    dock, lobby = by.get("dock"), by.get("lobby")
    if dock is None or lobby is None:
        raise RuntimeError(f"no summaries for both cohorts yet: {sorted(by)}")
    latest = next(w for w in dock["windows"] if w["start"] == dock["latest_judged_start"])
    if dock["verdict"] not in ("drift", "local") or lobby["verdict"] != "ok":
        raise RuntimeError(f"dock {dock['verdict']}, lobby {lobby['verdict']}")
    moved = max(latest["features"], key=lambda f: f["psi"])
    carried = ", ".join(latest["local_devices"]) or "several devices"
    return (
        f"cohort dock: {dock['verdict']} (carried by {carried}; {moved['name']} PSI "
        f"{moved['psi']:.2f}), cohort lobby: ok; report {out / 'drift.html'}"
    )
