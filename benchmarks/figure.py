"""The pieces every benchmark's figures are read and written with (``benchmarks/report.py`` and
``benchmarks/report_serving.py``): a path into a result, a number as text, and a ``Figure``.

A figure of several runs is a summary (``benchmarks/runs.py``): it is written as its median with
the range and the count, ``9,282 (8,900–9,500, 3 runs)``, so that no reader takes one run's luck
for the figure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from benchmarks.runs import is_summary, median_of

MISSING = "—"


def get(doc: dict[str, Any], path: str) -> Any:
    """``doc["a"]["b"]`` for ``"a.b"``; None when any step is missing."""
    cur: Any = doc
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _one(value: float, fmt: str, unit: str) -> str:
    if fmt.endswith("d") and float(value).is_integer():
        value = int(value)
    elif fmt.endswith("d"):
        fmt = fmt[:-1] + ".1f"  # a median of counts can fall between two
    return format(value, fmt) + unit


def num(value: Any, fmt: str, unit: str = "") -> str:
    """``value`` formatted (``unit`` after each number); a summary of several runs as
    ``median (min–max, n runs)``."""
    if is_summary(value):
        median = _one(value["median"], fmt, unit)
        if value["runs"] < 2:
            return median
        # A word ("req/s") is written once, after the median; a sign ("x", "%") after each.
        each = "" if unit.startswith(" ") else unit
        low, high = _one(value["min"], fmt, each), _one(value["max"], fmt, each)
        return f"{median} ({low}–{high}, {value['runs']} runs)"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return MISSING if value is None else str(value)
    return _one(value, fmt, unit)


def ratio(doc: dict[str, Any], a: str, b: str) -> float | None:
    """``a / b`` of two figures (their medians when they are summaries)."""
    x, y = median_of(get(doc, a)), median_of(get(doc, b))
    return x / y if isinstance(x, int | float) and isinstance(y, int | float) and y else None


def runs_of(doc: dict[str, Any]) -> int:
    """How many runs a result's figures are the median of: its ``runs``, else the most of any
    summary or ``*_runs`` list in it, else 1 (a single run)."""
    declared = doc.get("runs")
    if isinstance(declared, int) and not isinstance(declared, bool):
        return declared
    most = 1
    stack: list[Any] = [doc]
    while stack:
        cur = stack.pop()
        if is_summary(cur):
            most = max(most, int(cur["runs"]))
        elif isinstance(cur, dict):
            for key, value in cur.items():  # "speedup_runs": [..]: the rounds a median is of
                if key.endswith(("_runs", "_each_round")) and isinstance(value, list) and value:
                    most = max(most, len(value))
            stack.extend(cur.values())
        elif isinstance(cur, list):
            stack.extend(cur)
    return most


@dataclass(frozen=True)
class Figure:
    """One figure of edgebento beside the baseline measured in the same run."""

    what: str
    ours: str
    baseline: str
    baseline_name: str
    target: str = ""
