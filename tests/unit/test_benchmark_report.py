"""One source for every figure: the README's table and docs/benchmarks.md are what
``python -m benchmarks report`` writes from benchmarks/results/*.json, and nothing else."""

from __future__ import annotations

import json
import re
from pathlib import Path

from benchmarks import report, runs

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
    assert "| `new_bench` | headline | 42 widgets/s | — | — | 1 (single run) |" in table
    doc = report.benchmarks_doc(results)
    assert "machine not recorded" in doc


def test_the_machine_is_described_from_the_result() -> None:
    described = report.describe_machine(report.machine())
    assert "logical cores" in described and "Python" in described


def _summary(*values: float) -> dict[str, object]:
    return runs.summary(values)


def test_a_figure_of_several_runs_shows_its_median_its_range_and_its_count() -> None:
    rps = _summary(9282.4, 12743.0, 8900.2)
    assert report.num(rps, ",.0f") == "9,282 (8,900–12,743, 3 runs)"
    assert report.num(_summary(2.1, 2.9, 2.56), ".2f", "x") == "2.56x (2.10x–2.90x, 3 runs)"
    assert report.num(_summary(0.82, 0.97, 0.9), ".0%") == "90% (82%–97%, 3 runs)"
    assert report.num(_summary(283.2, 232.0, 319.1), ",.0f", " req/s") == (
        "283 req/s (232–319, 3 runs)"
    )
    # Counts stay counts; a median between two counts shows its half.
    assert report.num(_summary(0, 0, 3), "d") == "0 (0–3, 3 runs)"
    assert report.num(_summary(0, 1), "d") == "0.5 (0–1, 2 runs)"
    # One run is its value alone, as a plain number is.
    assert report.num(_summary(7.5), ".1f") == report.num(7.5, ".1f") == "7.5"


def test_the_median_is_the_middle_run_not_the_best() -> None:
    s = runs.summary([10.4, 7.7, 8.1])
    assert (s["median"], s["min"], s["max"], s["runs"]) == (8.1, 7.7, 10.4, 3)
    assert runs.median_of(s) == 8.1 and runs.median_of(3.0) == 3.0


def test_rounds_merge_into_summaries_and_disagreements_stay_visible() -> None:
    merged = runs.summarize(
        [
            {"rps": 100.0, "ok": True, "by": {"x": 1}, "note": "a", "only_here": 1},
            {"rps": 300.0, "ok": False, "by": {"x": 3}, "note": "a"},
            {"rps": 200.0, "ok": True, "by": {"x": 2}, "note": "a"},
        ]
    )
    assert merged["rps"]["median"] == 200.0 and merged["rps"]["runs"] == 3
    assert merged["by"]["x"]["values"] == [1.0, 3.0, 2.0]
    assert merged["ok"] == [True, False, True]  # a flag that differs is shown by round
    assert merged["note"] == "a"
    assert "only_here" not in merged


def _mlp_result(rounds: int) -> dict[str, object]:
    def s(*v: float) -> object:
        return runs.summary(v[:rounds])

    return {
        "headline": "h",
        "targets_met": False,
        "runs": rounds,
        "figures": {
            "edgebento": {"clients_64": {"requests_per_s": s(2851, 2700, 3000)}},
            "bare_asgi": {"clients_64": {"requests_per_s": s(3070, 3100, 2900)}},
            "plain_bentoml": {"clients_64": {"requests_per_s": s(257, 250, 260)}},
        },
        "ratios": {
            "clients_64": {
                "share_of_bare_asgi": s(0.929, 0.87, 1.03),
                "x_plain_bentoml": s(11.09, 10.8, 11.5),
                "cpu_bound_share_of_bare_asgi": s(0.6, 0.58, 0.61),
            }
        },
    }


def test_the_readme_table_shows_medians_with_ranges_and_how_many_runs(tmp_path: Path) -> None:
    (tmp_path / "serving_mlp.json").write_text(json.dumps(_mlp_result(3)))
    (tmp_path / "single.json").write_text(json.dumps({"headline": "42 widgets/s"}))
    results = report.load_results(tmp_path)
    table = report.readme_table(results)
    assert (
        "| `serving_mlp` | share of bare uvicorn ASGI by CPU per request, 64 clients | "
        "60% (58%–61%, 3 runs) | 100% (bare uvicorn ASGI, same model and codec) | >= 85% "
        "| median of 3 |"
    ) in table
    assert "| x plain BentoML, 64 clients | 11.09x (10.80x–11.50x, 3 runs) | 257 req/s " in table
    assert "| `single` | headline | 42 widgets/s | — | — | 1 (single run) |" in table
    doc = report.benchmarks_doc(results)
    assert (
        "| requests/s, 64 clients | 2,851 (2,700–3,000, 3 runs) | 3,070 (2,900–3,100, 3 runs) |"
    ) in doc
    assert "| share of bare uvicorn ASGI, 64 clients | 93% (87%–103%, 3 runs) | 100% " in doc
    assert "Runs: 3. A figure written `median (min–max, n runs)`" in doc
    assert "Runs: 1. A single run: these figures have no range yet." in doc


def test_a_result_of_one_run_is_marked_as_one(tmp_path: Path) -> None:
    (tmp_path / "serving_mlp.json").write_text(json.dumps(_mlp_result(1)))
    table = report.readme_table(report.load_results(tmp_path))
    assert (
        "| `serving_mlp` | share of bare uvicorn ASGI by CPU per request, 64 clients | 60% |"
        in (table)
    )
    assert "| 1 (single run) |" in table


def test_a_result_not_met_names_the_targets_it_missed() -> None:
    """The README's "all targets" column and docs/benchmarks.md say which target a result
    missed (its own, or a figure's), not only that one was: a row whose headline figure meets
    its target was marked "not met" for another figure's target, with nothing to say which."""
    doc = {
        "targets_met": False,
        "targets": {"fast": True, "small": False, "note": "text"},
        "figures": {"a": {"targets": {"recovery": False, "goodput": True}}, "b": 3},
    }
    assert report.unmet(doc) == ["small", "recovery (a)"]
    assert report._met(doc) == "**not met**: small, recovery (a)"
    assert report._met({"targets_met": False}) == "**not met**"
    assert report._met({"targets_met": True, "targets": {"x": False}}) == "met"
