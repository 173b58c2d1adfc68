from __future__ import annotations

from typing import Any

from rich.console import Console

from edgebento.cli.optimize import candidates_table


def _row(
    name: str,
    chosen: bool = False,
    violation: str | None = None,
    independent: bool = True,
    **fidelity: float,
) -> dict:
    return {
        "candidate": name,
        "size_bytes": 28_289,
        "gzip_bytes": 24_988,
        "latency": {"p50_ms": 0.0213, "p99_ms": 0.04, "batch": 64 if independent else 1},
        "speedup": 2.424,
        "row_independent": independent,
        "fidelity": fidelity or None,
        "error": None,
        "violation": violation,
        "chosen": chosen,
    }


def _render(rows: list[dict[str, Any]]) -> list[str]:
    console = Console(width=80, record=True)
    console.print(candidates_table(rows))
    return console.export_text().splitlines()


def test_the_candidates_table_fits_80_columns_with_every_figure() -> None:
    rows = [
        _row("fp32", accuracy=0.9806, top1_agreement=1.0, cosine_min=1.0),
        _row(
            "keras-prune-75% + dynamic per-channel reduce-range MatMul",
            violation="accuracy drop 1.2 pt > 1.0",
            independent=False,
            accuracy=0.9694,
            top1_agreement=0.98,
            cosine_min=0.5,
        ),
        _row("keras-prune-75%", chosen=True, accuracy=0.9861, top1_agreement=0.98, cosine_min=0.51),
    ]
    lines = _render(rows)
    assert all(len(line) <= 80 for line in lines)
    header = next(line for line in lines if line.split()[:1] == ["candidate"])
    assert header.split() == [
        "candidate",
        "MB",
        "gzip",
        "p50",
        "ms",
        "rows",
        "speed",
        "acc",
        "top-1",
        "cos",
    ]
    chosen = next(line for line in lines if line.strip().startswith("keras-prune-75%  "))
    assert chosen.split()[-1] == "✓" and "2.42x" in chosen and "0.9861" in chosen
    assert " ×64 " in chosen
    assert any(" alone " in line and line.rstrip().endswith("✗") for line in lines)
    assert any(line.rstrip().endswith("✗") for line in lines)


def test_only_the_fidelity_measures_a_run_has_get_a_column() -> None:
    lines = _render([_row("fp32", cosine_min=1.0), _row("dynamic", chosen=True, cosine_min=0.99)])
    header = next(line for line in lines if line.split()[:1] == ["candidate"])
    assert "cos" in header and "acc" not in header and "top-1" not in header
