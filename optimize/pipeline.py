"""``optimize_model``: source model in, verified ModelPack with its report out."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from modelpack import Samples, create_pack
from modelpack.errors import ConfigError, first_problem
from modelpack.iosig import read_io_signature
from modelpack.pack import source_sha256
from optimize import report as reports
from optimize.axes import settle
from optimize.bases import fused_model, op_types, plan, starting_models
from optimize.budget import DEFAULT_TIME_BUDGET, Clock, run_planned, stopped_note
from optimize.budget import summary as budget_summary
from optimize.convert import source_kind, to_onnx
from optimize.data import Dataset, load_npz, split, synthesize
from optimize.load import NormalizeConfig, SourceConfig, keep_source, normalize, opset_of
from optimize.machine import describe as describe_machine
from optimize.metrics import MetricSpec
from optimize.npz import open_npz
from optimize.passes import PassFailed, Runner
from optimize.pick import BASELINE, Budget, Candidate, Choice, pick
from optimize.search import Search, confirm, with_latency, with_smoothing
from optimize.verify import load as load_predictor

GOLDEN_ROWS = 8


class OptimizeOptions(BaseModel):
    """What the user asks for (CLI flags or ``optimize_model`` arguments), checked once."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    version: int = Field(gt=0)
    max_drop: float | None = Field(default=None, gt=0, lt=1)
    quantize: Literal["auto", "dynamic", "static", "off"] = "auto"
    prune: Literal["auto", "off"] | float = "auto"
    batch: int = Field(default=64, gt=0)  # the service's default batch (EDGEBENTO_MAX_BATCH)
    latency_seconds: float = Field(default=15.0, gt=0)
    trust_model_code: bool = False  # load formats that are programs (HDF5, SavedModel, TorchScript)
    metrics: tuple[str, ...] = ()  # --metric, as MetricSpec.parse reads them
    # Seconds from the start until no new candidate starts; the rest are listed as not tried.
    # 0: no limit.
    time_budget: float = Field(default=DEFAULT_TIME_BUDGET, ge=0, allow_inf_nan=False)


@dataclass(frozen=True)
class OptimizeResult:
    chosen: Candidate
    reason: str
    candidates: list[Candidate]
    rows: list[dict[str, Any]]  # the report's table
    report_json: Path
    report_html: Path
    pack_dir: Path
    notes: list[str] = field(default_factory=list)  # what the user should know beside the table
    machine: dict[str, Any] = field(default_factory=dict)  # the CPU the figures hold for
    # Each input's batch axis as proven on the data; inputs left out went whole into each run.
    batch_axes: dict[str, int] = field(default_factory=dict)


def _options(**values: Any) -> OptimizeOptions:
    try:
        options = OptimizeOptions(**values)
    except ValidationError as exc:
        raise ConfigError(first_problem(exc, "options")) from exc
    if isinstance(options.prune, float) and not 0 < options.prune < 1:
        raise ConfigError(
            f"--prune takes auto, off or a ratio between 0 and 1, not {options.prune}"
        )
    return options


def default_cache() -> Path:
    return Path(os.environ.get("EDGEBENTO_CACHE", "~/.cache/edgebento")).expanduser() / "optimize"


@contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not enabled,
        transient=False,
    ) as progress:
        yield progress


def _data(
    model: Path, inputs: Any, data: Path | None, eval_data: Path | None, notes: list[str]
) -> tuple[Dataset, Dataset, dict[str, int]]:
    """(calibration, evaluation, each output's rows axis): each file's batch axes proven on
    the FP32 model before any split, so that no feed is split on one axis and kept whole."""
    _, outputs = read_io_signature(model)
    fp32 = load_predictor(model, inputs, outputs)
    if data is None and eval_data is None:
        synthetic, axes = settle(fp32, inputs, synthesize(model, inputs), "the synthetic inputs")
        notes.append("fidelity was measured on synthetic inputs: pass --data for real figures")
        return synthetic, synthetic, axes
    found = {p: settle(fp32, inputs, load_npz(p, inputs), p.name) for p in (data, eval_data) if p}
    calibration = found[data][0] if data else None
    evaluation, axes = found[eval_data] if eval_data else found[data]  # type: ignore[index]
    if calibration is not None and eval_data is None:
        calibration, evaluation = split(calibration)
    if not evaluation.axes:
        notes.append("the data's rows could not be split: every feed ran whole")
    return calibration or evaluation, evaluation, axes


def optimize_model(
    source: Path,
    out: Path,
    *,
    name: str,
    version: int,
    data: Path | None = None,
    eval_data: Path | None = None,
    max_drop: float | None = None,
    quantize: str = "auto",
    prune: str | float = "auto",
    train_data: Path | None = None,
    key: Path | None = None,
    progress: bool = True,
    cache: Path | None = None,
    latency_seconds: float = 15.0,
    trust_model_code: bool = False,
    metrics: Sequence[str] = (),
    time_budget: float | None = None,
) -> OptimizeResult:
    clock = Clock(DEFAULT_TIME_BUDGET if time_budget is None else time_budget)
    """Prune and quantize ``source`` under an accuracy budget and write the best as a pack."""
    options = _options(
        name=name,
        version=version,
        max_drop=max_drop,
        quantize=quantize,
        prune=prune,
        latency_seconds=latency_seconds,
        trust_model_code=trust_model_code,
        metrics=tuple(metrics),
        time_budget=clock.budget,
    )
    specs = tuple(MetricSpec.parse(m) for m in options.metrics)
    source, out = Path(source), Path(out)
    if data is None:
        _torch_needs_data(source, options.trust_model_code)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty; give a new directory for the pack")
    runner = Runner(cache or default_cache())
    notes: list[str] = []
    with _progress(progress) as bars, tempfile.TemporaryDirectory(prefix="edgebento-opt-") as tmp:
        staging = Path(tmp)
        task = bars.add_task("convert and normalize", total=2)
        example = _raw_arrays(data) if data else None
        converted = staging / "source.onnx"
        kind = to_onnx(source, converted, example, trust_model_code=options.trust_model_code)
        bars.advance(task)
        base = runner.run("normalize", normalize, converted, NormalizeConfig())
        bars.advance(task)
        inputs, outputs = read_io_signature(base)
        calibration, evaluation, output_axes = _data(base, inputs, data, eval_data, notes)
        train = load_npz(train_data, inputs) if train_data else None
        labels = evaluation.labels is not None
        budget = Budget(options.max_drop or 0.01, labels, specs)

        task = bars.add_task("prune and calibrate", total=None)
        line = ["fp32"]  # the progress line: which candidate, and the time left
        bases = starting_models(runner, source, kind, base, options, calibration, train, notes)
        fused = fused_model(runner, base, inputs, notes)
        if fused is not None:  # right after FP32: the most promising base of a transformer
            bases = {BASELINE: base, "fused": fused} | bases
        search = Search(
            runner,
            inputs,
            outputs,
            calibration,
            evaluation,
            min(options.batch, evaluation.rows),
            budget,
            tick=lambda what: bars.update(task, description=f"{line[0]}: {what[:32]}"),
            metric_specs=specs,
            output_axes=output_axes,
        )
        planned = plan(bases, options, op_types(base))
        bars.update(task, total=len(planned) + 1, completed=0)
        started = time.monotonic()
        measured = [_fp32(search, runner, converted, base, notes)]
        clock.record("base", time.monotonic() - started)
        line[0] = "smoothing activation outliers"
        planned = with_smoothing(
            search, base, options.quantize, op_types(base), planned, clock.deadline
        )
        bars.update(task, total=len(planned) + 1)

        def show(done: int, text: str) -> None:
            line[0] = text
            bars.update(task, completed=done + 1, description=text, refresh=True)

        tail = 2 * options.latency_seconds  # the two latency rounds after the candidates
        tried, skipped = run_planned(search, planned, clock, show, tail)
        measured += tried
        line[0] = "keeping sensitive nodes in float"
        measured += search.refine(measured, bases, clock.deadline)
        # Cut short only where something missed the budget and refinement could have helped.
        refine_cut = clock.spent() and any(
            c.violation and not c.config.get("exclude") for c in tried
        )
        if skipped or refine_cut:
            notes.append(stopped_note(clock, len(measured) - len(skipped), skipped, refine_cut))
        bars.update(task, description="latency (interleaved)")
        measured = with_latency(measured, search, options.latency_seconds)
        bars.update(task, description="latency (finalists again)")
        measured = confirm(measured, search, options.latency_seconds)
        choice = pick(measured)
        if key is None:
            notes.append(
                "the pack is unsigned: devices and `edgebento bento import` refuse it; pass"
                " --key signing.key, or sign it later: edgebento pack sign PACK --key signing.key"
            )
        assert search.reference_fidelity is not None
        report = reports.build(
            measured,
            choice,
            budget,
            source=source.name,
            synthetic=evaluation.synthetic,
            footprint=runner.records(),
            notes=notes,
            machine=describe_machine(),
            time_budget=budget_summary(clock, len(measured) - len(skipped), skipped, refine_cut),
        )
        report_json = reports.write_json(report, staging / "report.json")
        png = reports.chart_png(report, budget, search.reference_fidelity.accuracy)
        report_html = reports.write_html(report, png, staging / reports.REPORT_HTML)
        parent = source_sha256(source)  # the model the user gave, not the candidate picked
        _write_pack(
            choice, search, evaluation, report, out, options, key, report_json, report_html, parent
        )
    return OptimizeResult(
        choice.candidate,
        choice.reason,
        measured,
        report["candidates"],
        out / "report.json",
        out / reports.REPORT_HTML,
        out,
        report["notes"],
        report["machine"],
        dict(evaluation.axes),
    )


def _fp32(
    search: Search, runner: Runner, converted: Path, base: Path, notes: list[str]
) -> Candidate:
    """FP32 is the user's model as given, so that a FP32 pick packs it unchanged. Only where a
    pack cannot hold it as given (it fails onnx.checker, say an output typed without a shape)
    or ONNX Runtime cannot run it (an opset it no longer implements) does the normalized model
    stand in, and the notes say why."""
    try:
        kept = runner.run("fp32", keep_source, converted, SourceConfig())
    except PassFailed as exc:
        why = f"it fails onnx.checker, which every pack's model must pass ({exc.reason})"
    else:
        candidate = search.measure(Candidate(BASELINE, (BASELINE,), kept, {}))
        if candidate.error is None:
            return candidate
        why = f"ONNX Runtime cannot run it ({candidate.error})"
    import onnx

    opset = opset_of(onnx.load(str(base), load_external_data=False))
    notes.append(
        f"the model as given is not packed: {why}; FP32, and a FP32 pick, are the normalized"
        f" model (opset {opset}, shapes inferred)"
    )
    return search.measure(Candidate(BASELINE, (BASELINE, "normalize"), base, {}))


def _torch_needs_data(source: Path, trust_model_code: bool) -> None:
    """A PyTorch file without --data: the trust rule first (without trust, data is moot), then
    what the data must hold."""
    if source_kind(source) != "torch":
        return
    if not trust_model_code:  # raises the refusal of a pickle or of untrusted TorchScript
        with tempfile.TemporaryDirectory(prefix="edgebento-opt-") as tmp:
            to_onnx(source, Path(tmp) / "never.onnx", {}, trust_model_code=False)
    raise ConfigError(
        "a PyTorch source needs --data: the export traces real inputs, an .npz with one array"
        " per parameter of forward, named as forward names them (docs/optimize.md)"
    )


def _raw_arrays(path: Path) -> Mapping[str, np.ndarray]:
    return open_npz(path, skip={"labels"})  # read lazily: only what the export asks for


def _write_pack(
    choice: Choice,
    search: Search,
    evaluation: Dataset,
    report: dict[str, Any],
    out: Path,
    options: OptimizeOptions,
    key: Path | None,
    report_json: Path,
    report_html: Path,
    parent: str,
) -> None:
    chosen = choice.candidate
    assert chosen.path is not None
    golden = evaluation.take(slice(0, GOLDEN_ROWS)).inputs
    outputs = search.predictors[chosen.name].run(golden, validate=False)
    row = next(r for r in report["candidates"] if r["chosen"])
    base = next(r for r in report["candidates"] if r["candidate"] == BASELINE)
    summary = {
        "chosen": chosen.name,
        "reason": choice.reason,
        "steps": list(chosen.steps),
        "speedup": row["speedup"],
        # The figures only (no per-metric list): stores such as BentoML's take flat values.
        "fidelity": {
            k: v for k, v in (row["fidelity"] or {}).items() if k != "scores" and v is not None
        },
        "budget": report["budget"],
        "size_bytes": row["size_bytes"],
        "gzip_bytes": row["gzip_bytes"],
        "fp32_size_bytes": base["size_bytes"],
        "fidelity_data": report["fidelity_data"],
        # Whether the service can batch it, and the CPU whose flags the speedup holds for.
        "row_independent": row["row_independent"],
        "measured_on": reports.machine_text(report["machine"]),
        "report": reports.REPORT_HTML,
    }
    create_pack(
        chosen.path,
        out,
        name=options.name,
        version=options.version,
        samples=Samples(dict(golden), dict(outputs)),
        report=report_json,
        optimization=summary,
        extras=[report_html],
        parent=parent,
        key=key,
    )
