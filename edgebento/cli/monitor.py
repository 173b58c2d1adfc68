"""``edgebento monitor``: drift by cohort from the summaries the fleet sent (docs/monitoring.md)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from pathlib import Path
from typing import Any

from edgebento.cli.registry import add_store_args

log = logging.getLogger("edgebento.monitor")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "monitor", help="drift by cohort: PSI, JS and KS per feature against the pack's baseline"
    )
    add_store_args(p)
    p.add_argument("--model", help="only this model")
    p.add_argument("--version", type=int, help="only this version (with --model)")
    p.add_argument(
        "--pack",
        type=Path,
        action="append",
        default=[],
        help="a pack directory to take a baseline from (default: fetched from the registry)",
    )
    p.add_argument(
        "--trust", type=Path, action="append", default=[], help="public key packs must be signed by"
    )
    p.add_argument("--out", type=Path, default=Path("drift"), help="directory for the reports")
    p.add_argument("--min-samples", type=int, default=200, help="rows a window needs (200)")
    p.add_argument("--alpha", type=float, default=0.001, help="false-discovery rate (0.001)")
    p.add_argument("--min-psi", type=float, default=0.02, help="smallest PSI that drifts (0.02)")
    p.add_argument(
        "--max-device-rate",
        type=float,
        default=10_000.0,
        help="rows per second a device can serve; past it its counts are capped (10000)",
    )
    p.add_argument("--confirm", type=int, default=2, help="drift windows in a row that alarm (2)")
    p.add_argument("--metrics-port", type=int, help="serve the gauges on /metrics and re-check")
    p.add_argument("--metrics-addr", default="127.0.0.1", help="address for /metrics")
    p.add_argument("--every", type=float, default=60.0, help="seconds between checks (serving)")
    p.add_argument("--check", action="store_true", help="exit 3 when a cohort raises the alarm")
    p.set_defaults(func=cmd_monitor)


def _once(args: argparse.Namespace, store: Any, metrics: Any) -> dict[str, Any]:
    from cloud_sync.drift import DriftOptions, cohorts_of, evaluate, load_summaries
    from cloud_sync.drift_baselines import load_baselines
    from cloud_sync.drift_report import report_html, result_doc

    options = DriftOptions(
        min_samples=args.min_samples,
        alpha=args.alpha,
        min_psi=args.min_psi,
        max_device_rate=args.max_device_rate,
        confirm=args.confirm,
    )
    loaded = load_summaries(store, args.model, args.version)
    wanted = {(s.model, s.version) for _, s in loaded.summaries}
    baselines, missing = load_baselines(wanted, args.pack, store, args.trust)
    for (model, version), why in missing.items():
        log.warning("%s v%s: no baseline (%s); its summaries are not judged", model, version, why)
    results = evaluate(loaded, baselines, cohorts_of(store), options)
    doc = result_doc(results, options, loaded.rejected)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "drift.json").write_text(json.dumps(doc, indent=1) + "\n")
    (args.out / "drift.html").write_text(
        report_html(results, {k: v[1] for k, v in baselines.items()})
    )
    if metrics is not None:
        metrics.update(results)
        (args.out / "drift.prom").write_text(metrics.render())
    return doc


def _print(doc: dict[str, Any], out: Path) -> None:
    if not doc["cohorts"]:
        print("no drift summaries with a baseline in the store yet")
    for c in doc["cohorts"]:
        judged = (w for w in c["windows"] if w["start"] == c["latest_judged_start"])
        latest = next(judged, c["windows"][-1])
        top = max(latest["features"], key=lambda f: f["psi"], default=None)
        worst = f"; top feature {top['name']} PSI {top['psi']:.3f}" if top else ""
        carried, masked = latest["local_devices"], latest.get("masked_by") or []
        note = f" (carried by {', '.join(carried)})" if carried else ""
        if carried and latest["devices"] == 1:
            note = f" (carried by {carried[0]} alone: one device never raises a fleet alarm)"
        note += f" (hidden by {', '.join(masked)}, left out)" if masked else ""
        alarm = " ALARM" if c["alarm"] else ""
        print(
            f"{c['model']} v{c['version']} cohort {c['cohort']}: {c['verdict']}{alarm}{note}; "
            f"{latest['rows']} rows ({latest.get('binned', latest['rows'])} binned), "
            f"{latest['devices']} devices in its latest judged window; "
            f"{c['drift_windows']}/{c['windows_total']} windows drifted{worst}"
        )
    if doc["rejected_summaries"]:
        print(f"summaries refused: {doc['rejected_summaries']}")
    print(f"report: {out / 'drift.html'}   result: {out / 'drift.json'}")


def cmd_monitor(args: argparse.Namespace) -> int:
    from cloud_sync.broker_url import check_listen_port
    from cloud_sync.drift_report import DriftMetrics
    from cloud_sync.store import open_store

    check_listen_port(args.metrics_port, "--metrics-port")
    store = open_store(args.store, endpoint_url=args.endpoint_url)
    metrics = DriftMetrics()
    doc = _once(args, store, metrics)
    _print(doc, args.out)
    if args.metrics_port:
        metrics.serve(args.metrics_port, args.metrics_addr)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        log.info("serving drift gauges on %s:%s", args.metrics_addr, args.metrics_port)
        while not stop.wait(args.every):
            doc = _once(args, store, metrics)
    return 3 if args.check and doc["verdict"] == "drift" else 0
