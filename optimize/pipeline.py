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
from modelpack.errors import ConfigError, EdgebentoError, first_problem
from modelpack.iosig import read_io_signature
from modelpack.pack import source_sha256
from optimize import report as reports
from optimize.convert import source_kind, to_onnx
from optimize.data import Dataset, load_npz, split, synthesize
from optimize.fusion import FuseConfig, bert_like, fuse
from optimize.keras_prune import KerasPruneConfig, prune_keras
from optimize.load import NormalizeConfig, normalize
from optimize.machine import describe as describe_machine
from optimize.metrics import MetricSpec
from optimize.npz import open_npz
from optimize.passes import PassFailed, Runner
from optimize.pick import BASELINE, Budget, Candidate, Choice, pick
from optimize.prune import PruneConfig, prune_with
from optimize.quantize import QuantizeConfig, search_space
from optimize.search import Search, confirm, hash_data, with_latency
from optimize.verify import layout
from optimize.verify import load as load_predictor

AUTO_PRUNE_RATIOS = (0.5, 0.75)
DEFAULT_TIME_BUDGET = 1800.0
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
    # Seconds for building and measuring candidates; past it the rest are listed as not tried.
    time_budget: float = Field(default=DEFAULT_TIME_BUDGET, gt=0)


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


def _bases(
    runner: Runner,
    source: Path,
    kind: str,
    base: Path,
    options: OptimizeOptions,
    calibration: Dataset,
    train: Dataset | None,
    notes: list[str],
) -> dict[str, Path]:
    """FP32 plus every pruned model to quantize further."""
    bases = {BASELINE: base}
    if options.prune == "off":
        return bases
    ratios = AUTO_PRUNE_RATIOS if options.prune == "auto" else (float(options.prune),)
    if kind == "keras" and train is not None:
        keras_configs = {"keras-sparse-80%": KerasPruneConfig()} | {
            # Cut units are re-learned by fine-tuning; sparsity on top of that cost accuracy
            # on digits (1.7 points at 50% units), so the two are separate candidates.
            f"keras-prune-{r:.0%}": KerasPruneConfig(units_ratio=r, sparsity=0.0)
            for r in ratios
        }
        for label, config in keras_configs.items():
            try:
                pruned = runner.run(
                    "keras-prune",
                    lambda s, d, c: prune_keras(source, d, c, train, options.trust_model_code),
                    base,
                    config,
                    data_key=hash_data(train),
                )
                bases[label] = runner.run("normalize", normalize, pruned, NormalizeConfig())
            except PassFailed as exc:
                notes.append(f"{label} failed: {exc.reason}")
        notes.append("tfmot sparsity gives compression (gzip) only: ONNX Runtime skips no zeros")
        return bases  # fine-tuned unit pruning beats cutting units from the ONNX graph blind
    if kind == "keras":
        notes.append("Keras pruning skipped: it fine-tunes, so it needs --train-data")
    for parent, model in list(bases.items()):
        prefix = "" if parent == BASELINE else f"{parent} + "
        for ratio in ratios:
            try:
                bases[f"{prefix}prune-{ratio:.0%}"] = runner.run(
                    "prune",
                    prune_with(calibration),
                    model,
                    PruneConfig(ratio=ratio),
                    data_key=hash_data(calibration),
                )
            except PassFailed as exc:
                notes.append(f"structured pruning at {ratio:.0%} not applied: {exc.reason}")
                break
    return bases


def _datasets(
    model: Path, inputs: Any, data: Path | None, eval_data: Path | None, notes: list[str]
) -> tuple[Dataset, Dataset]:
    if data is None and eval_data is None:
        synthetic = synthesize(model, inputs)
        notes.append("fidelity was measured on synthetic inputs: pass --data for real figures")
        return synthetic, synthetic
    calibration = load_npz(data, inputs) if data else None
    evaluation = load_npz(eval_data, inputs) if eval_data else None
    if calibration is not None and evaluation is None:
        calibration, evaluation = split(calibration)
    elif calibration is None:
        calibration = evaluation
    assert calibration is not None and evaluation is not None
    return calibration, evaluation


def _data(
    model: Path, inputs: Any, data: Path | None, eval_data: Path | None, notes: list[str]
) -> tuple[Dataset, Dataset, dict[str, int]]:
    """(calibration, evaluation, each output's rows axis), split only where the model allows."""
    _, outputs = read_io_signature(model)
    fp32 = load_predictor(model, inputs, outputs)
    calibration, evaluation = _datasets(model, inputs, data, eval_data, notes)
    evaluation, axes = layout(fp32, evaluation)
    calibration, _ = layout(fp32, calibration)
    if not evaluation.axes:
        notes.append("the data's rows could not be split: every feed ran whole")
    try:
        fp32.run(evaluation.take(slice(0, 1)).inputs, validate=False)
    except EdgebentoError as exc:
        raise ConfigError(f"the FP32 model refuses the data: {exc}") from exc
    return calibration, evaluation, axes


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
        time_budget=time_budget or DEFAULT_TIME_BUDGET,
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
        bases = _bases(runner, source, kind, base, options, calibration, train, notes)
        fused = _fused(runner, base, inputs, notes)
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
            tick=lambda what: bars.update(task, description=f"candidate: {what[:40]}"),
            metric_specs=specs,
            output_axes=output_axes,
        )
        deadline = time.monotonic() + options.time_budget
        planned = _plan(bases, options, _op_types(base))
        bars.update(task, total=len(planned) + 1, completed=0)
        measured = [search.measure(Candidate(BASELINE, (BASELINE,), base, {}))]
        bars.advance(task)
        for base_name, path, config in planned:
            if time.monotonic() > deadline:
                measured.append(search.skipped(base_name, config, options.time_budget))
            elif config is None:
                measured.append(search.measure(Candidate(base_name, (base_name,), path, {})))
            else:
                measured.append(search.measure(search.quantized(base_name, path, config)))
            bars.advance(task)
        measured += search.refine(measured, bases, deadline)
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
    )


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


def _plan(
    bases: dict[str, Path], options: OptimizeOptions, op_types: set[str]
) -> list[tuple[str, Path, QuantizeConfig | None]]:
    """What to build, most promising first: each base's quantized variants in the order
    ``search_space`` gives (static first for convolutions); pruned bases get the two most
    telling variants, and a static one (rows that stay independent) if those are dynamic."""
    found: list[tuple[str, Path, QuantizeConfig | None]] = []
    for base_name, path in bases.items():
        if base_name != BASELINE:
            found.append((base_name, path, None))
        space = search_space(options.quantize, True, op_types)
        if base_name.startswith(("prune", "keras")) or " + prune" in base_name:
            telling = [c for c in space if c.per_channel and not c.reduce_range]
            static = [c for c in telling if c.mode == "static"][:1]
            space = telling[:2] + [c for c in static if c not in telling[:2]]
        found += [(base_name, path, config) for config in space]
    return found


def _fused(runner: Runner, base: Path, inputs: Sequence[Any], notes: list[str]) -> Path | None:
    """The transformer-fused model, for BERT-like graphs; None for the others."""
    if not bert_like(_op_types(base), {s.name for s in inputs}):
        return None
    try:
        return runner.run("fuse", fuse, base, FuseConfig())
    except PassFailed as exc:
        notes.append(f"transformer fusion not applied: {exc.reason}")
        return None


def _raw_arrays(path: Path) -> Mapping[str, np.ndarray]:
    return open_npz(path, skip={"labels"})  # read lazily: only what the export asks for


def _op_types(model: Path) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(str(model), load_external_data=False).graph.node}


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
