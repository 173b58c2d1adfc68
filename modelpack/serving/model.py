"""One loaded model as the serving core runs it: the predictor, its batching (or why not), its
bounded queue and its result cache."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from modelpack.errors import InferenceError, InputError
from modelpack.manifest import Manifest, TensorSpec
from modelpack.metrics import InferenceMetrics
from modelpack.predictor import Predictor
from modelpack.serving.batching import Batcher
from modelpack.serving.cache import ResultCache
from modelpack.serving.faults import KnownGood
from modelpack.serving.gate import Gate
from modelpack.serving.limits import ServingLimits
from modelpack.serving.padding import SequenceAxis, cut_outputs, pad_feeds, sequence_axis
from modelpack.serving.tensors import FeedChecks

log = logging.getLogger(__name__)


def _probe_feed(specs: Mapping[str, TensorSpec], rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in specs.values():
        dims = spec.shape or []
        shape = [
            rows if axis == 0 else (d if isinstance(d, int) else 3) for axis, d in enumerate(dims)
        ]
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            array = rng.standard_normal(shape).astype(dtype)
        else:
            array = rng.integers(0, 2, size=shape).astype(dtype)
            if array.ndim:
                array[..., 0] = 1  # a mask of all zeros is a degenerate input for many models
        feed[spec.name] = array
    return feed


def _warmup_feed(predictor: Predictor) -> dict[str, np.ndarray]:
    """What ``Predictor.warmup`` ran: zeros, symbolic dims set to 1."""
    return {
        spec.name: np.zeros(
            tuple(d if isinstance(d, int) else 1 for d in (spec.shape or [])), spec.dtype
        )
        for spec in predictor.inputs.values()
    }


def _ort_message(exc: BaseException) -> str:
    """ONNX Runtime's status message without its source paths."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    text = text.rsplit("Status Message: ", 1)[-1]
    # "/onnxruntime_src/...h:84 Fn(args) cond was false. What went wrong": keep the last part.
    if text.startswith("/") and " was false. " in text:
        text = text.split(" was false. ", 1)[1]
    return text[:300]


def rows_are_independent(predictor: Predictor) -> str | None:
    """None when the model answers each row of a batch as it answers the row alone (what
    batching requests together needs); otherwise why not. Models that mix rows (batch
    statistics, a reduction over the batch axis) would leak one client's data into another's."""
    try:
        both = _probe_feed(predictor.inputs, 2, 0)
        together = predictor.run(both, validate=False)
        for row in range(2):
            alone = predictor.run({k: v[row : row + 1] for k, v in both.items()}, validate=False)
            for name, value in alone.items():
                part = together[name][row : row + 1]
                if part.shape != value.shape or not np.allclose(
                    part, value, rtol=1e-3, atol=1e-5, equal_nan=True
                ):
                    return f"output {name!r} of a row changes when other rows run beside it"
    except Exception as exc:  # the probe itself failed: do not batch what we cannot check
        return f"the batching probe did not run: {str(exc).splitlines()[0]}"
    return None


def _sequence_feed(
    specs: Mapping[str, TensorSpec], plan: SequenceAxis, length: int
) -> dict[str, np.ndarray]:
    feed = _probe_feed(specs, 1, 0)
    for name, axis in plan.inputs.items():
        array = feed[name]
        reps = [1] * array.ndim
        reps[axis] = length
        first = np.take(array, [0], axis=axis)
        feed[name] = np.tile(first, reps)  # the same token throughout: lengths differ only
    return feed


def checked_plan(predictor: Predictor, plan: SequenceAxis) -> SequenceAxis | None:
    """The manifest's padding plan, checked on the model itself: every output whose dim
    follows the sequence length is cut back (exporters name it differently, ``unk__6``, so the
    manifest's symbols do not find it), and padding must not change a request's answer (a
    model without a mask input sees the pad tokens). None when padding is not invisible: then
    only requests of equal length are batched together."""
    try:
        short, long = (_sequence_feed(predictor.inputs, plan, n) for n in (3, 5))
        a, b = predictor.run(short, validate=False), predictor.run(long, validate=False)
        outputs = dict(plan.outputs)
        for name in a:
            if a[name].ndim != b[name].ndim:
                continue  # not a tensor padding can be cut back from
            pairs = zip(a[name].shape, b[name].shape, strict=True)
            moved = [i for i, (x, y) in enumerate(pairs) if x != y]
            if len(moved) == 1 and moved[0] > 0 and a[name].shape[moved[0]] == 3:
                outputs.setdefault(name, moved[0])
        plan = replace(plan, outputs=outputs)
        padded, _ = pad_feeds([short, long], plan)
        cut = cut_outputs(predictor.run(padded[0], validate=False), 3, plan)
        for name, value in a.items():
            if cut[name].shape != value.shape or not np.allclose(
                cut[name], value, rtol=1e-3, atol=1e-5, equal_nan=True
            ):
                log.info("padding changes output %r: requests of one length batch together", name)
                return None
    except Exception as exc:
        log.info("the padding probe did not run (%s): no padding", str(exc).splitlines()[0])
        return None
    return plan


class RunCount:
    """Model runs and their rows, counted from the threads of a threaded target."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.runs = 0
        self.rows = 0

    def add(self, rows: int) -> None:
        with self._lock:
            self.runs += 1
            self.rows += rows

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return self.runs, self.rows


class ServedModel:
    def __init__(
        self,
        predictor: Predictor,
        limits: ServingLimits,
        metrics: InferenceMetrics,
        manifest: Manifest | None = None,
        batching: bool = True,
        running: int = 1,
        about: Mapping[str, Any] | None = None,
        samples: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        self.predictor = predictor
        self.manifest = manifest
        self.limits = limits
        self.about = dict(about or {})
        ref = predictor.model_ref
        self.name = str(ref.get("name", "model"))
        self.version = str(ref.get("version", "1"))
        # Inputs the model is known to answer (its golden samples, its warmup's zeros, the
        # first of each shape class that ran), which tell a request the model cannot run (400)
        # from a model that cannot run at all (500).
        self.known_good = KnownGood(samples)
        self.feed_checks = FeedChecks(predictor.inputs)  # check_feed, remembered per pattern
        if predictor.options.warmup and predictor.warmup_error is None:
            self.known_good.remember(_warmup_feed(predictor))
        self.cache = ResultCache(limits.cache_bytes) if limits.cache_bytes > 0 else None
        self.batching_off = self._why_not_batch(batching)
        plan = sequence_axis(manifest) if manifest is not None else None
        self.plan = checked_plan(predictor, plan) if plan and not self.batching_off else plan
        if self.batching_off and batching:
            # Requests then run one at a time: a throughput the user should hear about.
            log.warning(
                "%s v%s runs requests one at a time (no batching): %s",
                self.name,
                self.version,
                self.batching_off,
            )
        # Async targets (BentoML) queue in a Batcher: batch rows 1 when batching is off. It counts
        # its own runs, so it runs a member alone uncounted (``_run_checked``, not ``run``).
        self.batcher = Batcher(
            self._run_batch,
            self.plan,
            max_rows=1 if self.batching_off else limits.max_batch_rows,
            max_queue=limits.max_queue,
            retry_after_s=limits.retry_after_s,
            max_wait_s=limits.max_queue_wait_s,
            metrics=metrics,
            run_alone=self._run_checked,
        )
        # Threaded targets (the agent, Lambda) queue at the gate.
        self.gate = Gate(running, limits.max_queue, limits.retry_after_s, metrics)
        self.alone = RunCount()  # their runs: one per request, as edgebento_batch_size counts

    def _why_not_batch(self, wanted: bool) -> str | None:
        if not wanted:
            return "batching is off for this target"
        p = self.predictor
        outputs = self.manifest.outputs if self.manifest is not None else []
        if not p.batch_dynamic or not all(s.batch_dynamic for s in outputs):
            return "not every input and output has a dynamic batch dim"
        return rows_are_independent(p)

    def _run_batch(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Stacked requests: a failure is not classified here; the batcher runs each member
        alone (through ``run``), so only the request at fault fails."""
        outputs = self.predictor.run(feed, validate=False)
        self.known_good.remember(feed)
        return outputs

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One validated request run alone on a threaded target (``ServingCore.run_sync``, which
        observes ``edgebento_batch_size`` for it): counted, failing or not, as the Batcher counts
        its runs, so that ``metadata()["batches"]`` agrees with the metric on every target."""
        self.alone.add(self.feed_checks.rows(feed, self.limits))  # remembered: a dict lookup
        return self._run_checked(feed)

    def _run_checked(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One validated request through the model. When ONNX Runtime fails on it (FAIL, not
        INVALID_ARGUMENT: an integer division by zero, a Reshape the client's shapes do not
        fit), the model runs a known-good input again: if that still runs, the failure is this
        input's, a 400; if not, or nothing is known to run, it is the model's, an error (a
        500), which is what a rollout's error rate must see."""
        try:
            outputs = self.predictor.run(feed, validate=False)
        except InferenceError as exc:
            if not self.known_good.still_runs(feed, self._rerun):
                raise
            raise InputError(
                f"the model cannot run this input (a known-good input still runs): "
                f"{_ort_message(exc)}",
                reason="invalid",
            ) from exc
        self.known_good.remember(feed)
        return outputs

    def _rerun(self, feed: dict[str, np.ndarray]) -> None:
        self.predictor.run(feed, validate=False)

    @property
    def inputs(self) -> Mapping[str, TensorSpec]:
        return self.predictor.inputs

    def output_specs(self) -> list[TensorSpec]:
        # The predictor's, which came from the manifest's io signature even where the target
        # (the agent) serves without the manifest: never a dtype guessed from a name.
        return list(self.predictor.output_specs)

    def metadata(self) -> dict[str, Any]:
        m = self.manifest
        runs, rows = self.alone.snapshot()
        doc: dict[str, Any] = {
            "model": self.predictor.model_ref,
            **self.about,
            "inputs": [s.model_dump(mode="json") for s in self.inputs.values()],
            "outputs": [s.model_dump(mode="json") for s in self.output_specs()],
            "batching": self.batching_off is None,
            "batching_off": self.batching_off,
            # This model's runs since it was loaded, queued (BentoML) or alone (the agent,
            # Lambda): rows / count is the mean batch size under load.
            "batches": {"count": self.batcher.batches + runs, "rows": self.batcher.rows + rows},
            "cache_bytes": self.limits.cache_bytes,
        }
        if m is not None:
            doc["manifest"] = m.model_dump(mode="json")
            doc["sequence"] = [s.model_dump(mode="json") for s in m.sequence]
        return doc
