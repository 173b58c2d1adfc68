"""The demo's drift step: two cohorts of the cloud's registry of groups, dev-2's camera turns
darker, and ``edgebento monitor`` finds that cohort's drift from the devices' summaries (carried
by dev-2 alone: named, never a fleet alarm by one device, which the step's outcome says) while
dev-1's cohort stays ok."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

from edgebento.demo_fleet import Fleet, publish_all, reply_topic
from edgebento.demo_runner import BIN, Demo, console

WINDOW_S = "5"  # EDGEBENTO_DRIFT_WINDOW_S of the demo's agents: windows short enough to watch
ROWS, RATE, SECONDS = 8, 25, 12.0


def _traffic(device: str, calib: Path, dim: float) -> Iterator[tuple[str, dict[str, object]]]:
    """Requests of 8 rows drawn from the baseline's own data (times ``dim``)."""
    import numpy as np

    x = np.load(calib)["x"]
    rng = np.random.default_rng(len(device))
    for i in range(int(RATE * SECONDS)):
        rows = (x[rng.integers(0, len(x), ROWS)] * dim).round(4).tolist()
        line: dict[str, object] = {"id": f"drift-{i}", "inputs": {"x": rows}}
        line["reply_to"] = reply_topic(device, "drift")
        yield f"edgebento/{device}/infer", line


def _both(calib: Path) -> Iterator[tuple[str, dict[str, object]]]:
    """dev-1's and dev-2's requests in turn, ``RATE`` a second each."""
    for pair in zip(_traffic("dev-1", calib, 1.0), _traffic("dev-2", calib, 0.4), strict=True):
        yield from pair
        time.sleep(1 / RATE)


def step_drift(demo: Demo, fleet: Fleet, calib: Path) -> str:
    store = fleet.store
    demo.run(BIN / "edgebento", "fleet", "group", "add", "lobby", "dev-1", "--store", store)
    demo.run(BIN / "edgebento", "fleet", "group", "add", "dock", "dev-2", "--store", store)
    console.print(
        f"[dim]dev-1 sees images like the baseline's, dev-2's camera is 60 % darker: "
        f"{RATE} requests/s of {ROWS} rows each for {SECONDS:.0f} s[/dim]"
    )
    publish_all(fleet, _both(calib))  # one connection: the operator's certificate
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
    figure = f"{moved['name']} PSI {moved['psi']:.2f}"
    if dock["verdict"] == "drift":
        verdict = f"cohort dock: drift{' ALARM' if dock['alarm'] else ''} ({figure})"
    else:  # dock is dev-2 alone: its drift is named, and never a fleet alarm
        verdict = (
            f"cohort dock: drift on {', '.join(latest['local_devices'])} alone ({figure}), "
            "named but no alarm: a verdict must hold with any one device left out, so one "
            "(perhaps compromised) device can neither raise nor hide a fleet alarm"
        )
    return f"{verdict}; cohort lobby: ok; report {out / 'drift.html'}"
