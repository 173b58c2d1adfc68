"""One source for every figure: the README's table and docs/benchmarks.md are what
``python -m benchmarks report`` writes from benchmarks/results/*.json, and nothing else."""

from __future__ import annotations

import json
import re
from pathlib import Path

from benchmarks import report

NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?x?%?")


def _readme_section() -> str:
    text = report.README.read_text()
    return report.START + text.split(report.START, 1)[1].split(report.END, 1)[0] + report.END


def test_the_readme_table_is_generated_from_the_results() -> None:
    expected = report.readme_section(report.load_results())
    assert _readme_section() == expected, "run: python -m benchmarks report"


def test_docs_benchmarks_is_generated_from_the_results() -> None:
    expected = report.benchmarks_doc(report.load_results())
    assert report.DOC.read_text() == expected, "run: python -m benchmarks report"


def test_every_number_of_the_readme_table_is_in_docs_benchmarks() -> None:
    table = _readme_section().split("\n| benchmark")[1].split("\n\n")[0]
    doc = report.DOC.read_text()
    numbers = {n for n in NUMBER.findall(table)}
    assert numbers, "the README shows figures"
    assert {n for n in numbers if n not in doc} == set()


def test_a_result_of_unknown_shape_shows_its_headline_and_a_missing_figure_a_dash(
    tmp_path: Path,
) -> None:
    (tmp_path / "new_bench.json").write_text(json.dumps({"headline": "42 widgets/s"}))
    (tmp_path / "serving_mlp.json").write_text(
        json.dumps({"figures": {"edgebento": {"clients_64": {"requests_per_s": 10.0}}}})
    )
    results = report.load_results(tmp_path)
    table = report.readme_table(results)
    assert "| `new_bench` | headline | 42 widgets/s |" in table
    assert "| `serving_mlp` | requests/s, 64 clients | 10 | — |" in table
    doc = report.benchmarks_doc(results)
    assert "machine not recorded" in doc


def test_the_machine_is_described_from_the_result() -> None:
    described = report.describe_machine(report.machine())
    assert "logical cores" in described and "Python" in described
