"""Reading an optimization report's verdict: did the pack stay within its accuracy budget?

``report.json`` is written by ``optimize``; the registry reads it defensively, since a pack may
come from elsewhere. The verdict is taken from the first of these that is a boolean:
``within_budget`` at the top level, ``passed``, ``chosen.within_budget`` (when ``chosen`` is an
object), or ``within_budget`` of the candidate marked ``"chosen": true`` in ``candidates`` (the layout
``optimize/report.py`` writes: ``"chosen"`` names the candidate, each row has its verdict).
Nothing found means "unknown", which publishes. Fidelity for listings is taken from
``fidelity`` (number or object) at the top level or in the chosen candidate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelpack import REPORT_FILE, untrusted_json
from modelpack.errors import PackError

_FIDELITY_KEYS = ("accuracy", "top1_agreement", "cosine_min", "max_abs_diff")


@dataclass(frozen=True)
class BudgetVerdict:
    within_budget: bool | None  # None: the report says nothing (or there is no report)
    fidelity: str | None
    detail: str


def _chosen(report: dict[str, Any]) -> dict[str, Any]:
    chosen = report.get("chosen")
    if isinstance(chosen, dict):
        return chosen
    for candidate in report.get("candidates") or []:
        if isinstance(candidate, dict) and candidate.get("chosen") is True:
            return candidate
    return {}


def _fidelity_text(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        parts = [
            f"{k}={value[k]:.4g}"
            for k in _FIDELITY_KEYS
            if isinstance(value.get(k), int | float) and not isinstance(value.get(k), bool)
        ]
        return ", ".join(parts) or None
    return None


def verdict_of(report: dict[str, Any]) -> BudgetVerdict:
    chosen = _chosen(report)
    fidelity = _fidelity_text(report.get("fidelity")) or _fidelity_text(chosen.get("fidelity"))
    for where, value in (
        ("within_budget", report.get("within_budget")),
        ("passed", report.get("passed")),
        ("chosen.within_budget", chosen.get("within_budget")),
    ):
        if isinstance(value, bool):
            detail = f"report.json {where} = {str(value).lower()}"
            if fidelity:
                detail += f", fidelity {fidelity}"
            return BudgetVerdict(value, fidelity, detail)
    return BudgetVerdict(None, fidelity, "report.json gives no budget verdict")


def read_verdict(pack_dir: Path) -> BudgetVerdict:
    path = pack_dir / REPORT_FILE
    if not path.exists():
        return BudgetVerdict(None, None, "no report.json")
    try:
        report = untrusted_json.loads(path.read_bytes(), REPORT_FILE)
    except OSError as exc:
        raise PackError(f"{REPORT_FILE} is not readable: {exc}") from exc
    except untrusted_json.NotJsonError as exc:
        raise PackError(str(exc)) from exc
    if not isinstance(report, dict):
        raise PackError(f"{REPORT_FILE} must hold a JSON object")
    return verdict_of(report)
