"""One source for every figure: ``docs/benchmarks.md`` and the README's short table, both written
from ``benchmarks/results/*.json``, so that no number is typed by hand and none can disagree.

``python -m benchmarks report`` rewrites both (``make bench`` does it after running); the test
``tests/unit/test_benchmark_report.py`` fails when either is out of date with the JSON.

A figure measured in several runs is stored as a summary (``benchmarks/runs.py``) and shown as its
median with the range and the count; a result without one is marked as a single run.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import report_serving
from benchmarks.figure import MISSING, Figure, get, num, ratio, runs_of
from benchmarks.runs import median_of, summary

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
DOC = REPO / "docs" / "benchmarks.md"
README = REPO / "README.md"
START, END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"


def machine() -> dict[str, Any]:
    """What a figure was measured on: recorded into every result by ``python -m benchmarks``."""
    cpu, flags = platform.processor() or "unknown CPU", set()
    with _suppress_os():
        info = Path("/proc/cpuinfo").read_text()
        cpu = re.search(r"model name\s*:\s*(.+)", info).group(1).strip()  # type: ignore[union-attr]
        flags = set(re.search(r"flags\s*:\s*(.+)", info).group(1).split())  # type: ignore[union-attr]
    memory_gb = None
    with _suppress_os():
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))  # type: ignore[union-attr]
        memory_gb = round(kb / 1024 / 1024, 1)
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "isa": sorted(flags & {"avx2", "avx512f", "avx512_vnni", "amx_tile", "neon"}),
        "memory_gb": memory_gb,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        # Other work on the same cores moves the figures: the load says how much there was.
        "load_average_1m_at_end": round(os.getloadavg()[0], 2)
        if hasattr(os, "getloadavg")
        else None,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        # Run under `nice -n 5` on a shared machine, so that other work stays responsive.
        "niceness": os.nice(0) if hasattr(os, "nice") else None,
    }


def _suppress_os() -> contextlib.suppress:
    # Not Linux, or a /proc without the line: the description says less, the run goes on.
    return contextlib.suppress(OSError, AttributeError, ValueError)


def describe_machine(m: dict[str, Any] | None) -> str:
    if not m:
        return "machine not recorded in this result (measured before `make bench` recorded it)"
    isa = f", {'/'.join(m['isa']).upper()}" if m.get("isa") else ""
    mem = f", {m['memory_gb']} GB RAM" if m.get("memory_gb") else ""
    return (
        f"{m.get('cpu')}, {m.get('logical_cores')} logical cores{isa}{mem}, {m.get('os')}, "
        f"Python {m.get('python')}, {m.get('measured_at', '')[:10]}"
        + (
            f", load average {m['load_average_1m_at_end']} at the end"
            if m.get("load_average_1m_at_end") is not None
            else ""
        )
    )


# --- reading figures ---------------------------------------------------------------------------


_ratio = ratio


def _drop(doc: dict[str, Any], variant: str) -> float | None:
    fp32, ours = (
        median_of(get(doc, "side_by_side.fp32.accuracy")),
        median_of(get(doc, f"side_by_side.{variant}.accuracy")),
    )
    return (fp32 - ours) * 100 if isinstance(fp32, float) and isinstance(ours, float) else None


def _optimize_minilm(d: dict[str, Any]) -> list[Figure]:
    s = "side_by_side"

    def speed(who: str) -> str:
        runs = get(d, f"{s}.{who}.speedup_runs")  # side-by-side rounds, when it timed several
        value = summary(runs) if isinstance(runs, list) and runs else get(d, f"{s}.{who}.speedup")
        return num(value, ".2f", "x")

    def pooled(who: str) -> Any:  # the raw export's own cosine is per token: pooled decides
        found = get(d, f"{s}.{who}.pooled_cosine_min")
        return found if found is not None else get(d, f"{s}.{who}.cosine_min")

    return [
        Figure("speed, x FP32", speed("edgebento"), speed("quantize_dynamic"),
               "`quantize_dynamic` defaults", ">= 2.0x"),
        Figure("pooled cosine_min vs FP32", num(pooled("edgebento"), ".3f"),
               num(pooled("quantize_dynamic"), ".3f"), "`quantize_dynamic` defaults", ">= 0.99"),
        Figure("size, MB", num(_mb(get(d, f"{s}.edgebento.size_bytes")), ".1f"),
               num(_mb(get(d, f"{s}.fp32.size_bytes")), ".1f"), "FP32"),
    ]  # fmt: skip


def _optimize_digits(d: dict[str, Any]) -> list[Figure]:
    s = "side_by_side"
    gz = lambda v: _ratio(d, f"{s}.{v}.gzip_bytes", f"{s}.fp32.gzip_bytes")  # noqa: E731
    return [
        Figure("speed, x FP32", num(get(d, f"{s}.edgebento.speedup"), ".2f", "x"),
               num(get(d, f"{s}.quantize_dynamic.speedup"), ".2f", "x"), "`quantize_dynamic`"),
        # CPU per row: what other work on a shared machine moves least (see optimize_common).
        Figure("speed by CPU time, x FP32", num(get(d, f"{s}.edgebento.speedup_by_cpu"), ".2f", "x"),
               num(get(d, f"{s}.quantize_dynamic.speedup_by_cpu"), ".2f", "x"), "`quantize_dynamic`"),
        Figure("accuracy drop, points", num(_drop(d, "edgebento"), ".2f"),
               num(_drop(d, "quantize_dynamic"), ".2f"), "`quantize_dynamic`", "<= 1"),
        Figure("gzip size, x FP32", num(gz("edgebento"), ".3f") + "x",
               num(gz("quantize_dynamic"), ".3f") + "x", "`quantize_dynamic`", "<= 0.15x"),
        Figure("structured-pruned latency, x FP32", num(get(d, "structured_pruned_latency_ratio"), ".2f", "x"),
               "1.00x", "FP32", "<= 0.5x"),
    ]  # fmt: skip


def _optimize_cnn(d: dict[str, Any]) -> list[Figure]:
    s = "side_by_side"
    return [
        Figure(f"chosen ({d.get('right_family', '?')} is right)", str(d.get("chosen", MISSING)),
               "", "", "the right family"),
        Figure("best static QDQ, x FP32", num(get(d, f"{s}.best_static.speedup"), ".2f", "x"),
               num(get(d, f"{s}.best_dynamic.speedup"), ".2f", "x"), "best dynamic"),
        Figure("`quantize_dynamic` defaults, x FP32", num(get(d, f"{s}.quantize_dynamic.speedup"), ".2f", "x"),
               "1.00x", "FP32"),
    ]  # fmt: skip


def _lambda(d: dict[str, Any]) -> list[Figure]:
    f = "figures"
    return [
        Figure("cold start s (median, MiniLM int8)", num(get(d, f"{f}.cold_start_minilm_int8.total_median_s"), ".2f"),
               "", "", "<= 1.5"),
        Figure("cold start s (median, digits MLP)", num(get(d, f"{f}.cold_start_mlp.total_median_s"), ".2f"),
               "", "", "<= 1.5"),
        Figure("cold start CPU s (median, MiniLM int8)", num(get(d, f"{f}.cold_start_minilm_int8.cpu_median_s"), ".2f"),
               num(get(d, f"{f}.cold_start_mlp.cpu_median_s"), ".2f"), "digits MLP"),
        Figure("warm overhead µs per call", num(get(d, f"{f}.warm_mlp.overhead_direct_us"), ".0f"),
               num(get(d, f"{f}.warm_mlp.raw_onnxruntime_us"), ".0f"), "raw session.run", "<= 1000"),
    ]  # fmt: skip


def _agent(d: dict[str, Any]) -> list[Figure]:
    return [
        Figure("MQTT round trip p50 / p99 ms",
               f"{num(get(d, 'round_trip_ms.p50'), '.2f')} / {num(get(d, 'round_trip_ms.p99'), '.2f')}",
               f"{num(get(d, 'baseline_in_process_ms.p50'), '.3f')} / {num(get(d, 'baseline_in_process_ms.p99'), '.3f')}",
               "in-process call", "<= 2 / 10"),
        Figure("inferences/s pipelined", num(get(d, "pipelined.per_s"), ",.0f"), "", "", ">= 2,000"),
        Figure("failed during swaps", f"{num(get(d, 'swap_under_load.failed'), 'd')} of "
               f"{num(get(d, 'swap_under_load.requests'), ',d')}", "", "", "0"),
    ]  # fmt: skip


def _agent_memory(d: dict[str, Any]) -> list[Figure]:
    this, today = "after_load_and_two_swaps_mb.this_as_shipped", "after_load_and_two_swaps_mb.today"
    return [
        Figure("RSS MB after load and 2 swaps, as shipped", num(get(d, f"{this}.rss"), ".1f"),
               num(get(d, f"{today}.rss"), ".1f"), "issue 22's agent, same run", "<= 80"),
        Figure("anonymous MB after load and 2 swaps, as shipped",
               num(get(d, f"{this}.anonymous"), ".1f"), num(get(d, f"{today}.anonymous"), ".1f"),
               "issue 22's agent, same run", "<= 36"),
    ]  # fmt: skip


def _ingest(d: dict[str, Any]) -> list[Figure]:
    b = "baseline_one_object_per_message"
    return [
        Figure("records/s into S3 (moto)", num(get(d, "sync.records_per_s"), ",.0f"),
               num(get(d, f"{b}.records_per_s"), ",.0f"), "one object per message",
               f">= {num(d.get('target_records_per_s'), ',d')}"),  # the benchmark's own target
        Figure("sync CPU µs per record", num(get(d, "sync.sync_cpu_us_per_record"), ".0f"),
               num(get(d, "baseline_puback_design.sync_cpu_us_per_record"), ".0f"), "today's PUBACK design"),
        Figure("objects per 10,000 records", num(get(d, "sync.objects_per_10k_records"), ".1f"),
               num(get(d, f"{b}.objects_per_10k_records"), ".0f"), "one object per message"),
        Figure("stored exactly once", str(get(d, "sync.stored_exactly_once")), "", "", "True"),
    ]  # fmt: skip


def _build_inputs(d: dict[str, Any]) -> list[Figure]:
    return [
        Figure("peak RSS MiB reading a 1 MB .npz bomb", num(get(d, "new_reader.rss_mib"), ".0f"),
               num(get(d, "baseline_old_reader.rss_mib"), ".0f"), "the reader before", "arrays not used are never read"),
        Figure("peak RSS MiB refusing an array over the cap", num(get(d, "over_the_cap.rss_mib"), ".0f"),
               "", "", "refused small"),
    ]  # fmt: skip


def _drift(d: dict[str, Any]) -> list[Figure]:
    m, det = "hot_path_mqtt", "detection"
    alarm = get(d, "detection.windows_to_alarm") or {}  # its keys hold dots: not a ``get`` path
    # In process, the CPU each request gains (bench_drift's headline): one figure per case, the
    # steady state at the default budget (what the target is judged on) against binning every
    # row (a device's first window, and below its budget).
    hot = [h for h in d.get("hot_path_in_process_cpu") or [] if isinstance(h.get("cpu_loss"), dict)]
    every = "cpu_loss_every_row.median"
    in_process = [
        Figure(f"CPU added per request in process, steady state, {h.get('model')} "
               f"{h.get('rows_per_request')} row(s)", num(h["cpu_loss"]["median"] * 100, ".1f", " %"),
               num(get(h, every) * 100 if get(h, every) is not None else None, ".1f", " %"),
               "binning every row", "< 5 %")
        for h in hot
    ]  # fmt: skip
    return [
        *in_process,
        Figure("agent CPU µs per MQTT request, drift on", num(get(d, f"{m}.agent_cpu_us_per_request_on"), ".1f"),
               num(get(d, f"{m}.agent_cpu_us_per_request_off"), ".1f"), "drift off", "< 5 % more"),
        Figure("bytes per window, 20 features", num(get(d, "summary_size.bytes_per_window"), ",d"),
               "", "", "< 5,000"),
        Figure("drift summaries/s ingested", num(get(d, "ingestion.drift_summaries.records_per_s"), ",d"),
               num(get(d, "ingestion.baseline_inference_records.records_per_s"), ",d"),
               "inference records"),
        Figure("windows to alarm, 0.25 / 0.5 sd", f"{num(alarm.get('mean_shift_0.25_sd'), 'd')} / "
               f"{num(alarm.get('mean_shift_0.5_sd'), 'd')}", "", ""),
        Figure("false alarms per 100 windows", num(get(d, f"{det}.false_alarms_per_100_windows"), ".1f"),
               "", "", "0"),
    ]  # fmt: skip


def _mb(value: Any) -> float | None:
    return value / 1e6 if isinstance(value, int | float) else None


FIGURES: dict[str, Callable[[dict[str, Any]], list[Figure]]] = {
    "optimize_minilm": _optimize_minilm,
    "optimize_minilm_tokens": _optimize_minilm,
    "optimize_digits": _optimize_digits,
    "optimize_cnn": _optimize_cnn,
    "serving_mlp": report_serving.serving_mlp,
    "serving_overload": report_serving.serving_overload,
    "serving_minilm": report_serving.serving_minilm,
    "serving_memory": report_serving.serving_memory,
    "lambda": _lambda,
    "agent": _agent,
    "agent_memory": _agent_memory,
    "ingest": _ingest,
    "build_inputs": _build_inputs,
    "drift": _drift,
}


def load_results(results: Path = RESULTS) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))}


def figures_of(name: str, doc: dict[str, Any]) -> list[Figure]:
    """The comparison figures; a result of unknown shape falls back to its own headline."""
    picked = [
        replace(f, baseline="" if f.baseline.startswith(MISSING) else f.baseline)
        for f in FIGURES.get(name, lambda _: [])(doc)
        if not f.ours.startswith(MISSING)
    ]
    return picked or [Figure("headline", str(doc.get("headline", MISSING)), "", "")]


# The README's short table shows these figures of each benchmark (the first one otherwise).
HEADLINES = {
    "optimize_minilm": ("speed, x FP32", "pooled cosine_min vs FP32"),
    "optimize_minilm_tokens": ("speed, x FP32", "pooled cosine_min vs FP32"),
    "optimize_digits": ("speed, x FP32", "accuracy drop, points"),
    # Two rows each, as before the baselines came (the README stays under its length): the
    # share by CPU per request is the one a quiet machine reproduces (docs/benchmarks.md has both).
    "serving_mlp": (
        "share of bare uvicorn ASGI by CPU per request, 64 clients",
        "x plain BentoML, 64 clients",
    ),
    "serving_overload": ("goodput, share of capacity, tensor JSON",),
    "serving_minilm": ("sentences/s", "share of raw onnxruntime"),
    "lambda": (
        "cold start s (median, MiniLM int8)",
        "cold start s (median, digits MLP)",
        "warm overhead µs per call",
    ),
    "agent": ("MQTT round trip p50 / p99 ms",),
    "agent_memory": (
        "RSS MB after load and 2 swaps, as shipped",
        "anonymous MB after load and 2 swaps, as shipped",
    ),
}


def headlines_of(name: str, doc: dict[str, Any]) -> list[Figure]:
    figures = figures_of(name, doc)
    return [f for f in figures if f.what in HEADLINES.get(name, ())] or figures[:1]


def runs_note(doc: dict[str, Any]) -> str:
    """How many runs the result's figures come from, for the README's table; a result whose
    search runs once and whose timings are rounds after it says so in its ``runs_note``."""
    if isinstance(doc.get("runs_note"), str):
        return str(doc["runs_note"])
    runs = runs_of(doc)
    return f"median of {runs}" if runs > 1 else "1 (single run)"


def _met(doc: dict[str, Any]) -> str:
    met = {True: "met", False: "**not met**"}.get(doc.get("targets_met"), MISSING)  # type: ignore[arg-type]
    missed = unmet(doc)
    return f"{met}: {', '.join(missed)}" if doc.get("targets_met") is False and missed else met


def unmet(doc: dict[str, Any]) -> list[str]:
    """The targets a result says it missed, by name (``targets``: name -> met), and per figure
    where each has its own (``figures``: name -> {"targets": ...}), so a reader sees which."""
    found = [name for name, ok in _bools(doc.get("targets")) if not ok]
    figures = doc.get("figures")
    if isinstance(figures, dict):
        for figure, value in figures.items():
            if isinstance(value, dict):
                found += [
                    f"{name} ({figure})" for name, ok in _bools(value.get("targets")) if not ok
                ]
    return found


def _bools(targets: Any) -> list[tuple[str, bool]]:
    if not isinstance(targets, dict):
        return []
    return [(str(k), v) for k, v in targets.items() if isinstance(v, bool)]


# --- writing ----------------------------------------------------------------------------------------


def readme_table(results: dict[str, dict[str, Any]]) -> str:
    """The README's short table: the headline figures, each beside its baseline."""
    lines = [
        "| benchmark | figure | edgebento | baseline in the same run | target | runs | all targets |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, doc in results.items():
        for i, f in enumerate(headlines_of(name, doc)):
            base = f"{f.baseline} ({f.baseline_name})" if f.baseline else MISSING
            met, runs = (_met(doc), runs_note(doc)) if i == 0 else ("", "")
            lines.append(
                f"| `{name}` | {f.what} | {f.ours} | {base} | {f.target or MISSING} | {runs} "
                f"| {met} |"
            )
    return "\n".join(lines)


def readme_section(results: dict[str, dict[str, Any]]) -> str:
    machines = {describe_machine(doc.get("machine")) for doc in results.values()}
    where = machines.pop() if len(machines) == 1 else "the machines named in docs/benchmarks.md"
    return (
        f"{START}\n<!-- generated by `python -m benchmarks report` from benchmarks/results/*.json; "
        f"do not edit -->\n{readme_table(results)}\n\nMeasured on {where}. Every figure, its "
        f"baseline and the machine: [docs/benchmarks.md](docs/benchmarks.md).\n{END}"
    )


def benchmarks_doc(results: dict[str, dict[str, Any]]) -> str:
    out = [
        "# Benchmarks",
        "",
        "<!-- generated by `python -m benchmarks report` from benchmarks/results/*.json; "
        "do not edit -->",
        "",
        "`make bench` runs every module `benchmarks/bench_*.py`, writes its JSON to "
        "`benchmarks/results/` and then this page. Each figure stands beside the baseline the "
        "same run measured, so both saw the same machine under the same load. The machines were "
        "shared with other work while they ran: treat differences of a few percent as noise. "
        "A figure measured in several runs is their median, written with the range of the runs "
        "and their count (`median (min–max, n runs)`); ratios are taken within a run, where both "
        "sides saw the same load, and their median shown. Each result records the load average "
        "around its runs; a result of one run is marked so.",
        "",
    ]
    for name, doc in results.items():
        out += [f"## `{name}`", "", f"Targets: {_met(doc)}. {doc.get('headline', '')}".rstrip(), ""]
        out += [f"Measured on {describe_machine(doc.get('machine'))}.", "", _runs_line(doc), ""]
        out += ["| figure | edgebento | baseline | baseline is | target |", "|---|---|---|---|---|"]
        for f in figures_of(name, doc):
            out.append(
                f"| {f.what} | {f.ours} | {f.baseline or MISSING} | {f.baseline_name or MISSING} "
                f"| {f.target or MISSING} |"
            )
        for key, rows in doc.items():
            if _flat_rows(rows):
                out += ["", f"`{key}`:", "", *_table(rows)]
        notes = [
            _plain(doc[k])
            for k in ("setup", "load_generator", "note", "model", "batch")
            if k in doc
        ]
        if notes:
            out += ["", "Setup: " + "; ".join(notes) + "."]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _runs_line(doc: dict[str, Any]) -> str:
    runs = runs_of(doc)
    if isinstance(doc.get("runs_note"), str):  # a search once, its timings in rounds after it
        return (
            f"Runs: {doc['runs_note']}. A figure written `median (min–max, n runs)` is the "
            "median of its rounds with their range; the search's own figures are one run."
        )
    if runs > 1:
        return (
            f"Runs: {runs}. A figure written `median (min–max, n runs)` is the median of its "
            "runs with their range."
        )
    return "Runs: 1. A single run: these figures have no range yet."


def _flat_rows(value: Any) -> bool:
    """A list of records with scalar fields only (such as the agent's ``rss_breakdown``)."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(r, dict) for r in value)
        and all(not isinstance(v, dict | list) for r in value for v in r.values())
    )


def _table(rows: list[dict[str, Any]]) -> list[str]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return [
        "| " + " | ".join(keys) + " |",
        "|" + "---|" * len(keys),
        *("| " + " | ".join(str(r.get(k, MISSING)) for k in keys) + " |" for r in rows),
    ]


def _plain(value: Any) -> str:
    if isinstance(value, dict):
        return "; ".join(f"{k}: {v}" for k, v in value.items())
    return str(value)


def splice_readme(text: str, section: str) -> str:
    if START not in text or END not in text:
        raise ValueError(f"README.md has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    return head + section + rest.split(END, 1)[1]


def write(results_dir: Path = RESULTS, doc: Path = DOC, readme: Path = README) -> None:
    results = load_results(results_dir)
    doc.write_text(benchmarks_doc(results))
    readme.write_text(splice_readme(readme.read_text(), readme_section(results)))
