"""``python -m benchmarks [NAME ...]``: run the benchmarks and print their headline figures."""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

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
        "names", nargs="*", help=f"which to run (default all): {', '.join(available())}"
    )
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    console = Console()
    table = Table(title="benchmarks")
    for col in ("benchmark", "headline", "target met", "seconds"):
        table.add_column(col)
    for name in args.names or available():
        console.rule(name)
        start = time.perf_counter()
        module = importlib.import_module(f"benchmarks.bench_{name}")
        result = module.run(RESULTS)
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        met = result.get("targets_met")
        table.add_row(
            name,
            str(result.get("headline", "")),
            {True: "yes", False: "NO", None: "-"}[met],
            f"{time.perf_counter() - start:.0f}",
        )
    console.print(table)
    console.print(f"results in {RESULTS}/")
    return 0  # a missed target is reported in the table and the JSON, not as a crash


if __name__ == "__main__":
    sys.exit(main())
