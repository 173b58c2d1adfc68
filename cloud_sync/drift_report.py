"""What ``edgebento monitor`` writes: the JSON result, the HTML report (inline SVG charts of the
baseline against the latest window, per feature and cohort; no script, no CDN) and the
Prometheus gauges, by cohort and never by device (docs/metrics.md)."""

from __future__ import annotations

import html
import time
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from cloud_sync.drift import DriftOptions, WindowResult
from modelpack.baseline import Baseline

SCHEMA_VERSION = 1
MAX_COHORTS = 50  # gauges for at most this many cohorts (bounded cardinality)

Results = Mapping[tuple[str, int, str], list[WindowResult]]


def latest(windows: list[WindowResult]) -> WindowResult:
    """The newest window with a verdict: a quiet minute (too few rows) neither clears an alarm
    nor hides the last figures."""
    return next((w for w in reversed(windows) if w.verdict != "insufficient"), windows[-1])


def result_doc(
    results: Results, options: DriftOptions, rejected: Mapping[str, int], last: int = 10
) -> dict[str, Any]:
    """The JSON result: per (model, version, cohort) the last ``last`` windows and the latest
    verdict; ``verdict`` is ``drift`` when any cohort's latest window raises the alarm."""
    cohorts = []
    for (model, version, cohort), windows in sorted(results.items()):
        judged = latest(windows)
        cohorts.append(
            {
                "model": model,
                "version": version,
                "cohort": cohort,
                "verdict": judged.verdict,
                "alarm": judged.alarm,
                "latest_judged_start": judged.start,
                "windows_total": len(windows),
                "rows_total": sum(w.rows for w in windows),
                "drift_windows": sum(w.verdict == "drift" for w in windows),
                "alarms": sum(w.alarm for w in windows),
                "windows": [_window(w) for w in windows[-last:]],
            }
        )
    return {
        "schema_version": SCHEMA_VERSION,
        "generated_at": time.time(),
        "options": asdict(options),
        "rejected_summaries": dict(rejected),
        "verdict": "drift" if any(c["alarm"] for c in cohorts) else "ok",
        "cohorts": cohorts,
    }


def _window(w: WindowResult) -> dict[str, Any]:
    doc = asdict(w)
    doc["local_devices"] = list(w.local_devices)
    for f in doc["features"]:
        f.pop("current")
        for key in ("psi", "js", "ks"):
            f[key] = round(f[key], 5)
    return doc


# --- HTML --------------------------------------------------------------------------------------

_STYLE = """
body{font:14px system-ui,sans-serif;margin:2em;color:#222}
h2{margin-top:2em}.drift{color:#b00020;font-weight:600}.local{color:#b36b00}.ok{color:#1b5e20}
table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}
td:first-child,th:first-child{text-align:left}.charts{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0}figcaption{font-size:12px}
"""


def _chart(base: list[int], current: tuple[float, ...]) -> str:
    """Shares per bin: the baseline in grey, the latest window in blue (below and above the
    baseline's range are the first and last bars)."""
    width, height = 240, 70
    tb, tc = max(sum(base), 1), max(sum(current), 1.0)
    shares = [(b / tb, c / tc) for b, c in zip(base, current, strict=False)]
    top = max((max(s) for s in shares), default=1.0) or 1.0
    bar = width / max(len(shares), 1)
    rects = []
    for i, (b, c) in enumerate(shares):
        x = i * bar
        for offset, share, colour in ((0.0, b, "#9e9e9e"), (bar / 2, c, "#1565c0")):
            h = share / top * (height - 4)
            rects.append(
                f'<rect x="{x + offset:.1f}" y="{height - h:.1f}" width="{bar / 2 - 0.5:.1f}" '
                f'height="{h:.1f}" fill="{colour}"/>'
            )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img">{"".join(rects)}</svg>'
    )


def report_html(results: Results, baselines: Mapping[tuple[str, int], Baseline]) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>edgebento drift</title>",
        f"<style>{_STYLE}</style></head><body><h1>Drift by cohort</h1>",
        "<p>Grey: the pack's baseline; blue: the cohort's latest window with a verdict. A verdict of "
        "<span class='drift'>drift</span> holds with any one device left out; "
        "<span class='local'>local</span> is carried by the devices named; a device whose rows "
        "outweigh the others' is left out in turn, so it cannot hide their drift.</p>",
    ]
    for (model, version, cohort), windows in sorted(results.items()):
        w = latest(windows)
        baseline = baselines[(model, version)]
        cls = w.verdict if w.verdict in ("drift", "local", "ok") else ""
        alarm = " — ALARM" if w.alarm else ""
        parts.append(
            f"<h2>{html.escape(model)} v{version} · cohort {html.escape(cohort)}: "
            f"<span class='{cls}'>{html.escape(w.verdict)}{alarm}</span></h2>"
            f"<p>{w.rows} rows ({w.binned} binned) from {w.devices} devices in the latest "
            "window with a verdict; "
            f"{sum(x.verdict == 'drift' for x in windows)} of {len(windows)} windows drifted"
        )
        if w.local_devices:
            parts.append(f"; carried by {html.escape(', '.join(w.local_devices))}")
            if w.devices == 1:
                parts.append(" alone (one device never raises a fleet alarm)")
        if w.masked_by:
            parts.append(f"; hidden by {html.escape(', '.join(w.masked_by))}, left out")
        if w.suspects:
            parts.append(
                f"; capped (more rows than a device can serve): "
                f"{html.escape(', '.join(w.suspects))}"
            )
        parts.append("</p>")
        if not w.features:
            continue
        parts.append(
            "<table><tr><th>feature</th><th>PSI</th><th>JS</th><th>KS</th><th>p</th>"
            "<th>NaN</th><th>out of range</th><th>drift</th></tr>"
        )
        for f in sorted(w.features, key=lambda f: -f.psi):
            mark = "<span class='drift'>yes</span>" if f.drift else ""
            parts.append(
                f"<tr><td>{html.escape(f.name)}</td><td>{f.psi:.4f}</td><td>{f.js:.4f}</td>"
                f"<td>{f.ks:.3f}</td><td>{f.p:.2g}</td><td>{f.nan_share:.2%}</td>"
                f"<td>{f.out_of_range_share:.2%}</td><td>{mark}</td></tr>"
            )
        parts.append("</table><div class='charts'>")
        by_name = {f.name: f for f in baseline.features}
        for f in sorted(w.features, key=lambda f: -f.psi):
            parts.append(
                f"<figure>{_chart(by_name[f.name].counts, f.current)}"
                f"<figcaption>{html.escape(f.name)} · PSI {f.psi:.3f}</figcaption></figure>"
            )
        parts.append("</div>")
    parts.append("</body></html>")
    return "".join(parts)


# --- Prometheus --------------------------------------------------------------------------------


class DriftMetrics:
    """``edgebento_drift_*`` gauges, labelled by model, version, cohort (and feature for PSI):
    at most ``MAX_COHORTS`` cohorts of 64 features each, never a device."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Gauge

        self.registry = CollectorRegistry()
        cohort = ["model", "version", "cohort"]
        self.alarm = Gauge(
            "edgebento_drift_alarm",
            "1 while the cohort's latest windows drift (confirmed), else 0",
            cohort,
            registry=self.registry,
        )
        self.psi_max = Gauge(
            "edgebento_drift_psi_max",
            "largest PSI of a feature, latest window",
            cohort,
            registry=self.registry,
        )
        self.psi = Gauge(
            "edgebento_drift_psi",
            "PSI per feature, latest window",
            [*cohort, "feature"],
            registry=self.registry,
        )
        self.out_of_range = Gauge(
            "edgebento_drift_out_of_range_ratio",
            "largest share of a feature's values outside the baseline's range, latest window",
            cohort,
            registry=self.registry,
        )
        self.rows = Gauge(
            "edgebento_drift_window_rows",
            "rows in the cohort's latest window",
            cohort,
            registry=self.registry,
        )
        self.local = Gauge(
            "edgebento_drift_local_devices",
            "devices that alone carry a drift in the latest window (not an alarm)",
            cohort,
            registry=self.registry,
        )

    def update(self, results: Results) -> None:
        names = sorted({c for _, _, c in results}, key=lambda c: (c != "all", c))[:MAX_COHORTS]
        for (model, version, cohort), windows in sorted(results.items()):
            if cohort not in names:
                continue
            w = latest(windows)
            labels = (model, str(version), cohort)
            self.alarm.labels(*labels).set(1 if w.alarm else 0)
            self.psi_max.labels(*labels).set(max((f.psi for f in w.features), default=0.0))
            self.out_of_range.labels(*labels).set(
                max((f.out_of_range_share for f in w.features), default=0.0)
            )
            self.rows.labels(*labels).set(windows[-1].rows)
            self.local.labels(*labels).set(len(w.local_devices))
            for f in w.features:
                self.psi.labels(*labels, f.name).set(f.psi)

    def render(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        from prometheus_client import start_http_server

        start_http_server(port, addr=addr, registry=self.registry)
