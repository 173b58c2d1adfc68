"""report.json for machines, report.html (table plus a latency-vs-fidelity chart) for people."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from optimize.pick import Budget, Candidate, Choice
from optimize.verify import Fidelity

REPORT_HTML = "report.html"
SCHEMA_VERSION = 1


def fidelity_text(c: Candidate) -> str:
    f = c.fidelity
    if f is None:
        return "-"
    parts = []
    if f.accuracy is not None:
        parts.append(f"acc {f.accuracy:.2%}")
    if f.top1_agreement is not None:
        parts.append(f"top-1 {f.top1_agreement:.2%}")
    parts.append(f"cos_min {f.cosine_min:.4f}")
    return ", ".join(parts)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def fidelity_row(f: Fidelity | None) -> dict[str, Any] | None:
    """The summary figures, every score with its bound, and the score that decided."""
    if f is None:
        return None
    found = {k: v for k, v in asdict(f).items() if k != "scores"}
    found["scores"] = [
        {
            "output": s.output,
            "metric": s.metric,
            "value": _finite(s.value),
            "fp32": _finite(s.reference),
            "bound": s.bound,
            "decides": s.decides,
            "ok": s.ok,
        }
        for s in f.scores
    ]
    deciding = f.deciding
    found["decided_by"] = deciding.key if deciding else None
    found["decisive_value"] = _finite(deciding.value) if deciding else None
    return found


def row(c: Candidate, chosen: str, baseline_ms: float | None) -> dict[str, Any]:
    lat = c.latency
    return {
        "candidate": c.name,
        "steps": list(c.steps),
        "config": c.config,
        "size_bytes": c.size.bytes if c.size else None,
        "gzip_bytes": c.size.gzip_bytes if c.size else None,
        "latency": asdict(lat) | {"ms_per_row": lat.ms_per_row} if lat else None,
        "speedup": round(baseline_ms / lat.ms_per_row, 3) if lat and baseline_ms else None,
        # The service batches requests together only when each row's answer is its own.
        "row_independent": c.row_independent,
        "batching_off": c.batching_off,
        "fidelity": fidelity_row(c.fidelity),
        "within_budget": c.within_budget,
        "violation": c.violation,
        "error": c.error,
        "chosen": c.name == chosen,
    }


def build(
    candidates: Sequence[Candidate],
    choice: Choice,
    budget: Budget,
    *,
    source: str,
    synthetic: bool,
    footprint: list[dict[str, Any]],
    notes: Sequence[str],
    machine: dict[str, Any] | None = None,
    time_budget: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``machine``: the CPU the latencies were measured on (``optimize.machine.describe``);
    ``time_budget``: the budget, and what it left untried (``optimize.budget.summary``)."""
    base = next((c for c in candidates if c.name == "fp32"), None)
    baseline_ms = base.latency.ms_per_row if base and base.latency else None
    return {
        "schema_version": SCHEMA_VERSION,
        "source": source,
        "budget": budget.describe(),
        "decided_by": _decided(candidates, choice),
        "fidelity_data": "synthetic inputs (no --data given)" if synthetic else "held-back data",
        "chosen": choice.candidate.name,
        "reason": choice.reason,
        "summary": f"chosen {choice.candidate.name}: {choice.reason}",
        "candidates": [row(c, choice.candidate.name, baseline_ms) for c in candidates],
        "notes": list(notes),
        "machine": machine,
        "time_budget": time_budget,
        "footprint": footprint,
    }


def _decided(candidates: Sequence[Candidate], choice: Choice) -> list[str]:
    """The metrics that judged the candidates (the same plan for all of them)."""
    base = next((c for c in candidates if c.fidelity is not None), None)
    if base is None or base.fidelity is None:
        return []
    return [s.key for s in base.fidelity.scores if s.decides]


def rows_text(row: dict[str, Any]) -> str:
    """Row independence in a word: batched with other requests, or served alone."""
    if row["row_independent"] is None:
        return "-"
    return "independent" if row["row_independent"] else "mixed"


def write_json(report: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path


def _fidelity_axis(c: dict[str, Any], labels: bool) -> float | None:
    f = c["fidelity"]
    if not f:
        return None
    return f["accuracy"] if labels and f["accuracy"] is not None else f["cosine_min"]


def chart_png(report: dict[str, Any], budget: Budget, reference: float | None) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = budget.labels and reference is not None
    points: list[tuple[float, float, dict[str, Any]]] = []
    for c in report["candidates"]:
        y = _fidelity_axis(c, labels)
        if c["latency"] is not None and y is not None:
            points.append((float(c["latency"]["ms_per_row"]), float(y), c))
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    # The chosen one is drawn last so that nothing hides it.
    for x, y, c in sorted(points, key=lambda p: bool(p[2]["chosen"])):
        color = "tab:green" if c["chosen"] else ("tab:blue" if c["within_budget"] else "tab:red")
        ax.scatter(x, y, color=color, s=90 if c["chosen"] else 30, zorder=3 if c["chosen"] else 2)
        # Only FP32, the pick and the Pareto front are named; the table names the rest.
        pareto = not any(ox <= x and oy >= y and (ox, oy) != (x, y) for ox, oy, _ in points)
        if c["chosen"] or c["candidate"] == "fp32" or pareto:
            ax.annotate(
                c["candidate"], (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points"
            )
    line = (
        (reference - budget.max_drop) if labels and reference is not None else 1 - budget.max_drop
    )
    ax.axhline(line, color="tab:red", linestyle="--", label=f"budget: {budget.describe()}")
    ax.set_xlabel("ms per row, at the batch the service runs (p50)")
    ax.set_ylabel("accuracy" if labels else "cosine_min vs FP32")
    ax.set_title("latency against fidelity (green: chosen, red: outside the budget)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _cells(c: dict[str, Any]) -> list[str]:
    lat = c["latency"]
    f = c["fidelity"] or {}
    fid = ", ".join(
        f"{k} {f[k]:.4f}"
        for k in ("accuracy", "top1_agreement", "cosine_min", "pooled_cosine_min")
        if f.get(k) is not None
    )
    if f.get("decided_by") and f.get("decisive_value") is not None:
        fid += f"; decided by {f['decided_by']} = {f['decisive_value']:.4f}"
    status = c["error"] or c["violation"] or ("chosen" if c["chosen"] else "within budget")
    return [
        c["candidate"],
        f"{c['size_bytes'] / 1e6:.2f} MB / {c['gzip_bytes'] / 1e6:.2f} MB"
        if c["size_bytes"]
        else "-",
        rows_text(c),
        str(lat["batch"]) if lat else "-",
        f"{lat['p50_ms']:.2f}" if lat else "-",
        f"{lat['p99_ms']:.2f}" if lat else "-",
        f"{lat['p50_ms_batch1']:.3f}" if lat else "-",
        f"{c['speedup']:.2f}x" if c["speedup"] else "-",
        fid or "-",
        status,
    ]


def _batch(report: dict[str, Any]) -> int:
    return max((c["latency"]["batch"] for c in report["candidates"] if c["latency"]), default=1)


def machine_text(machine: dict[str, Any] | None) -> str:
    if not machine:
        return "an unrecorded machine"
    flags = ", ".join(machine["flags"]) or "no AVX2, AVX-512 or AMX"
    return f"{machine['cpu']} ({machine['logical_cores']} logical cores; {flags})"


def write_html(report: dict[str, Any], png: bytes, path: Path) -> Path:
    head = [
        "candidate",
        "size / gzip",
        "rows",
        "batch served",
        "p50 ms",
        "p99 ms",
        "p50 ms batch 1",
        "speedup",
        "fidelity",
        "status",
    ]
    rows = "\n".join(
        "<tr{}>{}</tr>".format(
            ' class="chosen"' if c["chosen"] else "",
            "".join(f"<td>{html.escape(x)}</td>" for x in _cells(c)),
        )
        for c in report["candidates"]
    )
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in report["notes"])
    image = base64.b64encode(png).decode()
    path.write_text(
        f"""<!doctype html>
<html><head><meta charset="utf-8"><title>edgebento optimize: {html.escape(report["source"])}</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left}}
tr.chosen{{background:#e6f4ea;font-weight:bold}}</style></head><body>
<h1>edgebento optimize</h1>
<p>Source <code>{html.escape(report["source"])}</code>. Budget: {html.escape(report["budget"])}.
Deciding metrics: {html.escape(", ".join(report["decided_by"]) or "none")}.
Fidelity measured on {html.escape(report["fidelity_data"])}.
Speed is per row at the batch the service runs: up to {_batch(report)} rows for candidates whose
rows are independent, one request at a time for those whose rows mix (dynamic int8 scales a
whole batch at once). Measured on {html.escape(machine_text(report.get("machine")))}.</p>
<p><b>Chosen: {html.escape(report["chosen"])}</b>: {html.escape(report["reason"])}.</p>
<table><tr>{"".join(f"<th>{h}</th>" for h in head)}</tr>
{rows}
</table>
<h2>Latency against fidelity</h2>
<img alt="latency against fidelity" src="data:image/png;base64,{image}">
<ul>{notes}</ul>
</body></html>
"""
    )
    return path
