"""The search: build candidates (prune x quantize), verify them all, refine by node exclusion."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from modelpack import Predictor, TensorSpec
from modelpack.errors import EdgebentoError
from optimize import metrics, qdq_switch, sensitivity, verify
from optimize.data import Dataset
from optimize.machine import u8s8_saturates
from optimize.metrics import MetricSpec
from optimize.passes import PassFailed, Runner
from optimize.pick import BASELINE, Budget, Candidate
from optimize.quantize import PREPROCESS_FALLBACKS, QuantizeConfig, preprocess, quantize_with
from optimize.sensitivity import Exclusion
from optimize.smooth import SmoothConfig, best_alpha, smooth_with
from optimize.verify import Fidelity, Outputs

log = logging.getLogger(__name__)

EXCLUDE_TRIES = 5  # real quantizer runs per refined candidate
# How far past the budget the simulated greedy goes, as a share of --max-drop: the held-back
# data's worst row is not the calibration's, so the real runs may need more nodes in float.
SIM_HEADROOM = 0.5
SENSITIVITY_ROWS = 64


def smooth_scored() -> QuantizeConfig:
    """The int8 a smoothing strength is judged by: dynamic, per-channel weights, MatMuls only
    (what smoothing is for); 7-bit weights on a CPU whose int8 products saturate with 8
    (``optimize.machine.u8s8_saturates``): smoothing widens the weights."""
    return QuantizeConfig(
        mode="dynamic", per_channel=True, reduce_range=u8s8_saturates(), op_types=("MatMul",)
    )


def smooth_planned() -> tuple[QuantizeConfig, ...]:
    """The variants planned on the smoothed base: the scored one, and every op type."""
    scored = smooth_scored()
    return scored, scored.model_copy(update={"op_types": ()})


Tick = Callable[[str], None]


@dataclass
class Search:
    """What one search works with, and the sessions it keeps open for the latency round."""

    runner: Runner
    inputs: Sequence[TensorSpec]
    outputs: Sequence[TensorSpec]
    calibration: Dataset
    evaluation: Dataset
    batch: int
    budget: Budget
    tick: Tick
    metric_specs: Sequence[MetricSpec] = ()  # the user's --metric, empty for the defaults
    reference: Outputs = field(default_factory=dict)
    reference_fidelity: Fidelity | None = None
    plan: list[MetricSpec] = field(default_factory=list)
    output_axes: dict[str, int] = field(default_factory=dict)
    predictors: dict[str, Predictor] = field(default_factory=dict)
    preprocessed: dict[Path, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # eval run time: a first latency
    smoothed_bases: dict[str, Path] = field(default_factory=dict)  # what ``smoothed`` made

    def measure(self, candidate: Candidate) -> Candidate:
        """Load, run on the eval data, compare with FP32; failures become the reason."""
        self.tick(candidate.name)
        if candidate.error or candidate.path is None:
            return candidate
        try:
            predictor = verify.load(candidate.path, self.inputs, self.outputs)
            start = time.perf_counter()
            outputs = verify.run_all(predictor, self.evaluation, self.batch, self.output_axes)
            self.seconds[candidate.name] = time.perf_counter() - start
        except EdgebentoError as exc:
            return replace(candidate, error=str(exc))
        if candidate.name == BASELINE:
            self.reference = outputs
            self.plan = metrics.plan(
                self.metric_specs,
                outputs,
                metrics.mask_input(verify.rows_first(self.evaluation)),
                self.evaluation.labels is not None,
            )
        found = verify.fidelity(
            self.reference, outputs, self.evaluation, self.plan, self.budget.max_drop
        )
        if candidate.name == BASELINE:
            self.reference_fidelity = found
        self.predictors[candidate.name] = predictor
        assert self.reference_fidelity is not None
        batching_off = verify.batching_refusal(predictor, self.outputs)
        return replace(
            candidate,
            fidelity=found,
            size=verify.size_of(candidate.path),
            violation=self.budget.violation(self.reference_fidelity, found),
            row_independent=batching_off is None,
            batching_off=batching_off,
        )

    def quantized(self, base_name: str, base: Path, config: QuantizeConfig) -> Candidate:
        name = _name(base_name, config)
        steps = (base_name, "preprocess", "quantize")
        try:
            source = self._preprocess(base)
            data = self.calibration if config.mode == "static" else None
            key = str(hash_data(self.calibration)) if data is not None else ""
            path = self.runner.run("quantize", quantize_with(data), source, config, key)  # type: ignore[arg-type]
        except PassFailed as exc:
            return Candidate(name, steps, None, config.model_dump(mode="json"), error=exc.reason)
        return Candidate(name, steps, path, config.model_dump(mode="json"))

    def skipped(self, base_name: str, config: QuantizeConfig | None, why: str) -> Candidate:
        label = base_name if config is None else _name(base_name, config)
        return Candidate(
            label,
            (base_name,),
            None,
            {} if config is None else config.model_dump(mode="json"),
            error=why,
        )

    def _preprocess(self, base: Path) -> Path:
        """ORT's pre-processing, retried without symbolic shapes, then without optimization."""
        if base in self.preprocessed:
            return self.preprocessed[base]
        last: PassFailed | None = None
        for config in PREPROCESS_FALLBACKS:
            try:
                path = self.runner.run("preprocess", preprocess, base, config)
            except PassFailed as exc:
                last = exc
                continue
            self.preprocessed[base] = path
            return path
        log.info("pre-processing failed (%s); quantizing the graph as it is", last)
        self.preprocessed[base] = base
        return base

    def refine(
        self,
        candidates: list[Candidate],
        bases: dict[str, Path],
        deadline: float,
        max_tries: int = 4,
    ) -> list[Candidate]:
        """Keep the nodes that matter in float, for the most promising candidates that miss
        the budget: the fastest first (by their eval run), then the closest to the budget."""
        added: list[Candidate] = []
        # Only where quantization broke the budget: a pruned base that misses it stays missed.
        base_ok = {c.name for c in candidates if c.error is None and c.violation is None}
        failing = [
            c
            for c in candidates
            if c.error is None
            and c.violation is not None
            and c.config.get("mode")
            and not c.config.get("exclude")
            and c.steps[0] in base_ok
        ]
        # Eval runs within 30% are one speed tier (one run's noise on a shared CPU).
        fastest = min((self.seconds.get(c.name, 1e9) for c in failing), default=1.0) or 1.0
        failing.sort(
            key=lambda c: (int(self.seconds.get(c.name, 1e9) / fastest / 1.3), _quality_key(c))
        )
        for candidate in failing[:max_tries]:
            if time.monotonic() > deadline:
                break
            base = bases.get(candidate.steps[0]) or self.smoothed_bases[candidate.steps[0]]
            added += self._refine_one(candidate, base, deadline)
        return added

    def _refine_one(self, candidate: Candidate, base: Path, deadline: float) -> list[Candidate]:
        """Few enough of the simulation's nodes in float to pass for real (see
        ``sensitivity.shortest_prefix``): every model the real quantizer built on the way."""
        config = QuantizeConfig.model_validate(candidate.config)
        try:
            exclusion = self._exclusion(base, candidate, config, deadline)
        except Exception as exc:  # an unusual graph: skip refinement, keep the search going
            log.info("sensitivity failed on %s: %s", candidate.name, exc)
            return []
        built: list[Candidate] = []

        def passes(k: int) -> bool | None:
            excluded = replace_exclude(config, exclusion.order[:k])
            built.append(self.measure(self.quantized(candidate.steps[0], base, excluded)))
            if built[-1].error or time.monotonic() > deadline:
                return None
            return built[-1].violation is None

        sensitivity.shortest_prefix(len(exclusion.order), exclusion.start, passes, EXCLUDE_TRIES)
        return built

    def _exclusion(
        self, base: Path, candidate: Candidate, config: QuantizeConfig, deadline: float
    ) -> Exclusion:
        """The simulated greedy exclusion for ``config``, on the graph the quantizer sees:
        for static QDQ the quantized candidate itself, for dynamic a simulation of it."""
        source = self._preprocess(base)
        if config.mode == "static":
            assert candidate.path is not None
            switchable = qdq_switch.build(candidate.path, source)
        else:
            switchable = sensitivity.build(
                source,
                per_channel=config.per_channel,
                reduce_range=config.reduce_range,
                op_types=config.op_types,
            )
        rows = self.calibration.take(slice(0, SENSITIVITY_ROWS))
        margin = self._margin(rows)

        def run(predictor: Predictor, flags: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            return verify.run_all(predictor, rows, self.batch, self.output_axes, flags)

        # Against FP32 itself: a QDQ model quantizes its graph outputs whatever the switches say.
        fp32 = verify.run_all(self.predictors[BASELINE], rows, self.batch, self.output_axes)
        score = sensitivity.scorer(switchable, self.outputs, rows, run, margin, fp32)
        return sensitivity.greedy(switchable, score, deadline, SIM_HEADROOM * self.budget.max_drop)

    def _margin(
        self, rows: Dataset
    ) -> Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray]], float]:
        """The deciding metric's margin to the budget on ``rows`` (calibration rows)."""
        inputs = verify.rows_first(rows)

        def margin(reference: Mapping[str, np.ndarray], found: Mapping[str, np.ndarray]) -> float:
            scores = metrics.evaluate(
                self.plan, reference, found, inputs, rows.labels, self.budget.max_drop
            )
            return min((s.margin for s in scores if s.decides), default=0.0)

        return margin

    def smoothed(self, base: Path, deadline: float) -> tuple[str, Path] | None:
        """The SmoothQuant-style base (``optimize.smooth``) at the strength that scores best on
        the calibration rows after ``smooth_scored`` int8; None where no strength beats int8
        of the unsmoothed model there, or the model has nothing to smooth."""
        rows = self.calibration.take(slice(0, SENSITIVITY_ROWS))
        margin = self._margin(rows)
        fp32 = verify.run_all(self.predictors[BASELINE], rows, self.batch, self.output_axes)
        transform = smooth_with(self.calibration)
        key = hash_data(self.calibration)
        built: dict[tuple[str, float], Path] = {}
        scored: dict[tuple[str, float], float] = {}
        scored_as = smooth_scored()

        def score(source: Path, label: str) -> float | None:
            if time.monotonic() > deadline:
                return None
            candidate = self.quantized(label, source, scored_as)
            if candidate.path is None:
                return -1e9
            try:
                predictor = verify.load(candidate.path, self.inputs, self.outputs)
                found = verify.run_all(predictor, rows, self.batch, self.output_axes)
            except EdgebentoError as exc:
                log.info("%s does not run: %s", label, exc)
                return -1e9
            return margin(fp32, found)

        def smoothed_score(scope: str, alpha: float) -> float | None:
            self.tick(f"smoothing at {alpha:g}")
            config = SmoothConfig(alpha=alpha, scope=scope)  # type: ignore[arg-type]
            try:
                built[scope, alpha] = self.runner.run("smooth", transform, base, config, key)
            except PassFailed as exc:  # (nothing to smooth in this scope): every strength fails
                log.info("smoothing %s at %g failed: %s", scope, alpha, exc.reason)
                return None
            found = score(built[scope, alpha], f"smooth-{alpha:g}")
            if found is not None:
                scored[scope, alpha] = found
            return found

        plain = score(base, BASELINE)
        # The Muls after normalizations first (cheap); every MatMul where that is not enough.
        for scope in ("normalized", "all"):
            try:
                best_alpha(functools.partial(smoothed_score, scope))
            except ValueError:
                continue
            if max(scored.values(), default=-1e9) >= 0:
                break
        log.info("smoothing: %s against %s unsmoothed", scored, plain)
        if plain is None or not scored or max(scored.values()) <= plain:
            return None
        scope, alpha = max(scored, key=lambda k: scored[k])
        label = f"smooth-{alpha:g}" if scope == "normalized" else f"smooth-all-{alpha:g}"
        self.smoothed_bases[label] = built[scope, alpha]
        return label, built[scope, alpha]


def _name(base_name: str, config: QuantizeConfig) -> str:
    return config.label if base_name == BASELINE else f"{base_name} + {config.label}"


def replace_exclude(config: QuantizeConfig, nodes: tuple[str, ...]) -> QuantizeConfig:
    return config.model_copy(update={"exclude": nodes})


def _quality_key(c: Candidate) -> Any:
    """Closest to the budget first: those need the fewest exclusions."""
    f = c.fidelity
    return -(f.cosine_min if f else 0.0) - (f.accuracy or 0.0 if f else 0.0)


def hash_data(data: Dataset) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(data.inputs):
        digest.update(name.encode())
        digest.update(data.inputs[name].tobytes())
    return digest.hexdigest()


def _alone(candidates: Sequence[Candidate]) -> set[str]:
    """The candidates the service runs one request at a time: timed at one row only."""
    return {c.name for c in candidates if c.row_independent is False}


def with_latency(candidates: list[Candidate], search: Search, seconds: float) -> list[Candidate]:
    """One interleaved latency round over every model that loaded, each at the batch the
    service will run it at."""
    loaded = {c.name: search.predictors[c.name] for c in candidates if c.name in search.predictors}
    found = verify.latencies(
        loaded, search.evaluation, search.batch, seconds, alone=_alone(candidates)
    )
    return [replace(c, latency=found.get(c.name)) if c.name in found else c for c in candidates]


def confirm(
    candidates: list[Candidate], search: Search, seconds: float, finalists: int = 3
) -> list[Candidate]:
    """A second interleaved round over FP32 and the fastest few within the budget.

    On a CPU that others share, one round's medians can rank two close candidates wrongly; the
    finalists are timed again side by side, and the others' figures are scaled by how FP32's
    moved between the rounds so that every speedup stays against the same FP32.
    """
    base = next((c for c in candidates if c.name == BASELINE and c.latency), None)
    ranked = sorted(
        (c for c in candidates if c.within_budget and c.name != BASELINE and c.latency),
        key=lambda c: c.latency.ms_per_row if c.latency else 0.0,
    )[:finalists]
    if base is None or base.latency is None or not ranked:
        return candidates
    names = [BASELINE, *(c.name for c in ranked)]
    found = verify.latencies(
        {n: search.predictors[n] for n in names},
        search.evaluation,
        search.batch,
        seconds,
        alone=_alone(candidates),
    )
    scale = found[BASELINE].p50_ms / base.latency.p50_ms
    return [
        replace(c, latency=found[c.name])
        if c.name in found
        else replace(c, latency=_scaled(c.latency, scale))
        if c.latency
        else c
        for c in candidates
    ]


def _scaled(latency: verify.Latency, factor: float) -> verify.Latency:
    return replace(
        latency,
        p50_ms=latency.p50_ms * factor,
        p99_ms=latency.p99_ms * factor,
        p50_ms_batch1=latency.p50_ms_batch1 * factor,
        p99_ms_batch1=latency.p99_ms_batch1 * factor,
    )


def with_smoothing(
    search: Search,
    base: Path,
    mode: str,
    model_ops: set[str],
    planned: list[tuple[str, Path, QuantizeConfig | None]],
    deadline: float,
) -> list[tuple[str, Path, QuantizeConfig | None]]:
    """``planned`` with the smoothed base's dynamic int8 first, for attention models with real
    calibration data (outliers seen on synthetic inputs say nothing of the user's)."""
    if (
        mode not in ("auto", "dynamic")
        or not attention_like(model_ops)
        or search.calibration.synthetic
        or BASELINE not in search.predictors
    ):
        return planned
    found = search.smoothed(base, deadline)
    if found is None:
        return planned
    name, path = found
    # The float base too: refinement starts only from bases measured within the budget.
    return [*((name, path, c) for c in smooth_planned()), (name, path, None), *planned]


def attention_like(model_ops: set[str]) -> bool:
    return {"MatMul", "Softmax"} <= model_ops
