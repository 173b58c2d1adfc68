"""``python -m benchmarks [NAME ...]``: run the benchmarks, print their headline figures and
rewrite docs/benchmarks.md and the README's table from every result (``python -m benchmarks
report`` does only the rewriting)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks import report

RESULTS = Path(__file__).parent / "results"


def available() -> list[str]:
    return sorted(
        m.name.removeprefix("bench_")
        for m in pkgutil.iter_modules([str(Path(__file__).parent)])
        if m.name.startswith("bench_")
    )


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument(
        "names",
        nargs="*",
        help=f"which to run (default all): {', '.join(available())}; or 'report' alone",
    )
    parser.add_argument(
        "--no-report",
        action="store_true",
        help="write the results' JSON only, not docs/benchmarks.md and the README's table",
    )
    args = parser.parse_args()
    if args.names == ["report"]:
        report.write()
        print(f"wrote {report.DOC} and the table of {report.README} from {RESULTS}/")
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    console = Console()
    table = Table(title="benchmarks")
    for col in ("benchmark", "headline", "target met", "seconds"):
        table.add_column(col)
    failed = []
    for name in args.names or available():
        console.rule(name)
        start = time.perf_counter()
        environ = dict(os.environ)
        try:
            module = importlib.import_module(f"benchmarks.bench_{name}")
            result = module.run(RESULTS)
        except Exception as exc:  # one broken benchmark must not hide the others' figures
            console.print_exception(max_frames=5)
            failed.append(name)
            table.add_row(
                name,
                f"FAILED: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                "-",
                f"{time.perf_counter() - start:.0f}",
            )
            continue
        finally:
            # Benchmarks set EDGEBENTO_* variables for what they start; the next starts clean.
            os.environ.clear()
            os.environ.update(environ)
        result["machine"] = report.machine()
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        met = result.get("targets_met")
        table.add_row(
            name,
            str(result.get("headline", "")),
            {True: "yes", False: "NO", None: "-"}[met],
            f"{time.perf_counter() - start:.0f}",
        )
    console.print(table)
    if args.no_report:
        console.print(f"results in {RESULTS}/")
    else:
        report.write()
        console.print(f"results in {RESULTS}/; figures in {report.DOC} and {report.README}")
    # A missed target is reported in the table and the JSON; only a benchmark that broke fails.
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
