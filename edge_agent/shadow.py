"""Shadow runs on the device: a new version installed beside the live one, run on a sample of
live inputs off the hot path, its answers compared with the live model's.

``start`` fetches and verifies the pack exactly as an install does (signature, hashes, above the
device's mark, golden samples through the health check), into ``shadow/`` beside the packs,
never recorded as installed: the device keeps serving its current version and its mark does not
move. The hot path (``offer``, from the serving core after each answered request) only looks at
a clock and, at most ``rate`` times a second, hands the request's tensors to one slot; a
background thread runs the shadow model on them, and only while the agent's inference queue is
empty (a busy device drops the sample and counts it). Each run adds to cumulative figures
(``cloud_sync.shadow_figures.ShadowFigures``): agreement by the metric that decided the pack's
own optimization (``decided_by`` in its signed ``report.json``: top-1 for ``top1`` and
``accuracy``, the row's cosine for the cosines, the share of rows within the pack's bound for
``max-abs``, exact rows for ``equal``), else top-1 for class probabilities (or labelled
scores) and the mean cosine of the first output; the largest absolute difference; both run
times; errors. They leave in the status and as telemetry records of kind ``shadow``,
through the outbox like every record. ``stop`` removes the copy; a shadow also stops by itself
after ``for_s`` twice over, should its controller never come back.
"""

from __future__ import annotations

import logging
import math
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cloud_sync.redact import redact_text
from modelpack.errors import EdgebentoError

# The figures' pydantic models and modelpack.monitor are imported when a shadow starts: most
# devices never run one (tests/unit/edge_agent/test_footprint.py).
if TYPE_CHECKING:
    from cloud_sync.shadow_figures import ShadowFigures
    from edge_agent.inference import InferenceService
    from edge_agent.updater import Updater
    from modelpack.pack import Pack
    from modelpack.predictor import Predictor

log = logging.getLogger(__name__)
IDLE_WAIT_S = 0.05  # how long a sample waits for the infer queue to empty before it is dropped
LIFETIME_FACTOR = 2.0  # a shadow nobody stops ends after for_s times this

Sample = tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray], float]


@dataclass
class _Active:
    pack: Pack
    predictor: Predictor
    root: Path
    rate: float
    until: float
    figures: ShadowFigures
    slot: Sample | None = None
    wake: threading.Event = field(default_factory=threading.Event)
    stopped: bool = False
    output: str | None = None  # the output compared for agreement, chosen at the first run
    bound: float | None = None  # max_abs: the largest difference a row may have and agree


class ShadowRunner:
    def __init__(
        self,
        updater: Updater,
        inference: InferenceService,
        record: Callable[[str, dict[str, Any]], None],
        publish: Callable[[], None],
    ) -> None:
        self.updater, self.inference = updater, inference
        self.record, self.publish = record, publish
        self.dir = updater.config.data_dir / "shadow"
        shutil.rmtree(self.dir, ignore_errors=True)  # a copy from before a restart: not trusted
        self._active: _Active | None = None
        self.next_at = math.inf  # when the hot path may hand over its next sample
        self._last: ShadowFigures | None = None  # kept after a stop or failure, for the status
        self._lock = threading.Lock()

    # --- commands --------------------------------------------------------------------------

    def start(self, name: str, version: int, rate: float, for_s: float) -> dict[str, Any]:
        """Install ``name`` v``version`` beside the live pack, verified as any install, and
        start shadowing it. A pack that fails any check is reported, never run."""
        self.stop("replaced by a new shadow")
        try:
            pack, predictor, root = self._install(name, version)
        except EdgebentoError as exc:
            from cloud_sync.shadow_figures import ShadowFigures

            failed = ShadowFigures.model_validate(
                {"model": {"name": name, "version": version}, "state": "failed"}
            )
            failed.reason = redact_text(str(exc))[:512]
            self._report(failed)
            raise
        figures = self.run_beside(pack, predictor, root, rate, for_s)
        log.info("shadowing %s v%s at %g runs/s", name, version, rate)
        return {"shadow": figures.model_dump(mode="json")}

    def run_beside(
        self, pack: Pack, predictor: Predictor, root: Path, rate: float, for_s: float
    ) -> ShadowFigures:
        """Start shadowing a pack already verified and installed at ``root`` (``start`` does
        both; the benchmark hands one over)."""
        from cloud_sync.shadow_figures import ShadowFigures

        m = pack.manifest
        figures = ShadowFigures.model_validate(
            {"model": {"name": m.name, "version": m.version}, "state": "running"}
        )
        until = time.monotonic() + for_s * LIFETIME_FACTOR
        active = _Active(pack, predictor, root, rate, until, figures)
        with self._lock:
            self._active = active
            self.next_at = 0.0
        threading.Thread(target=self._loop, args=(active,), name="shadow", daemon=True).start()
        self._report(figures)
        return figures

    def stop(self, why: str = "stopped") -> dict[str, Any]:
        with self._lock:
            active, self._active = self._active, None
            self.next_at = math.inf
        if active is None:
            return {"shadow": None if self._last is None else self._last.model_dump(mode="json")}
        active.stopped = True
        active.wake.set()
        if active.figures.state == "running":
            active.figures.state, active.figures.reason = "stopped", why
        shutil.rmtree(active.root, ignore_errors=True)
        self._report(active.figures)
        return {"shadow": active.figures.model_dump(mode="json")}

    def _install(self, name: str, version: int) -> tuple[Pack, Predictor, Path]:
        self.dir.mkdir(parents=True, exist_ok=True)
        staging = self.dir / uuid.uuid4().hex
        try:
            pack, predictor = self.updater.stage_beside(name, version, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return pack, predictor, staging

    # --- the hot path ----------------------------------------------------------------------

    def offer(  # the serving core calls it only once ``next_at`` is past
        self,
        feed: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray],
        current_s: float,
    ) -> None:
        """After an answered request: a clock read, and rarely a reference handed over."""
        active = self._active
        if active is None or active.slot is not None:
            return
        now = time.monotonic()
        if now < self.next_at:
            return
        self.next_at = now + 1.0 / active.rate
        active.slot = (feed, outputs, current_s)
        active.wake.set()

    # --- the background thread -------------------------------------------------------------

    def _loop(self, active: _Active) -> None:
        while not active.stopped:
            active.wake.wait(1.0)
            active.wake.clear()
            if time.monotonic() > active.until:
                self.stop("no controller stopped it in time")
                return
            sample, active.slot = active.slot, None
            if sample is None or active.stopped:
                continue
            if not self._idle():
                active.figures.busy += 1
                continue
            try:
                self._run(active, *sample)
            except Exception as exc:  # the shadow's fault, never the live model's
                active.figures.errors += 1
                if active.figures.errors == 1:
                    log.warning("the shadow model failed: %s", exc)

    def _idle(self) -> bool:
        """The infer queue is empty now, or within ``IDLE_WAIT_S``."""
        deadline = time.monotonic() + IDLE_WAIT_S
        while getattr(self.inference, "_pending", 0) > 0:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        return True

    def _run(
        self,
        active: _Active,
        feed: Mapping[str, np.ndarray],
        live: Mapping[str, np.ndarray],
        current_s: float,
    ) -> None:
        # Checked against the shadow's own signature before its clock starts: the live run's
        # feed was checked before its clock, so both times are the model runs alone (with the
        # check inside, the 8-input test MLP's run took 1.7x its time without, medians).
        checked = active.predictor.validate(feed)
        start = time.perf_counter()
        answer = active.predictor.run(checked, validate=False)
        took = time.perf_counter() - start
        f = active.figures
        if active.output is None:
            active.output, f.metric, active.bound = _choose(active.pack, answer)
            f.bound = active.bound
        name = active.output
        new, old = np.asarray(answer[name]), np.asarray(live[name])
        if new.shape != old.shape:
            raise EdgebentoError(f"{name}: shape {new.shape} against the live {old.shape}")
        rows = len(new) if new.ndim else 1
        new2, old2 = new.reshape(rows, -1).astype(np.float64), old.reshape(rows, -1)
        if f.metric == "top1":
            agreeing = float((new2.argmax(axis=1) == old2.argmax(axis=1)).sum())
        elif f.metric == "max_abs":
            within = np.abs(new2 - old2).max(axis=1, initial=0.0) <= (active.bound or 0.0)
            agreeing = float(within.sum())
        elif f.metric == "equal":
            agreeing = float((new2 == old2).all(axis=1).sum())
        else:
            norms = np.linalg.norm(new2, axis=1) * np.linalg.norm(old2, axis=1)
            dots = (new2 * old2).sum(axis=1)
            cosine = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 1.0)
            agreeing = float(np.clip(cosine, 0.0, 1.0).sum())
        worst = max(
            float(np.max(np.abs(np.asarray(answer[k], np.float64) - np.asarray(live[k]))))
            for k in answer
            if k in live and np.shape(answer[k]) == np.shape(live[k]) and np.size(answer[k])
        )
        if not np.isfinite(worst):
            raise EdgebentoError("the shadow answered NaN or infinity")
        f.samples += 1
        f.rows += rows
        f.agreeing += agreeing
        f.max_abs = worst if f.max_abs is None else max(f.max_abs, worst)
        f.shadow_ms += took * 1000
        f.current_ms += current_s * 1000

    # --- reporting -------------------------------------------------------------------------

    @property
    def figures(self) -> ShadowFigures | None:
        active = self._active
        return active.figures if active is not None else self._last

    def status(self) -> dict[str, Any] | None:
        figures = self.figures
        return None if figures is None else figures.model_dump(mode="json", exclude_none=True)

    def flush(self) -> None:
        """At each telemetry tick while a shadow runs: a record and a fresh status."""
        active = self._active
        if active is not None:
            self._report(active.figures)

    def _report(self, figures: ShadowFigures) -> None:
        from cloud_sync.shadow_figures import KIND

        self._last = figures
        self.record(KIND, figures.model_dump(mode="json", exclude_none=True))
        self.publish()


def _choose(pack: Pack, answer: Mapping[str, np.ndarray]) -> tuple[str, Any, float | None]:
    """The output compared, how, and the bound for ``max_abs``: the pack's own metric when its
    report names one a device can compute, else top-1 for class probabilities or labelled
    scores, else the cosine of the first output."""
    own = _pack_metric(pack, answer)
    if own is not None:
        return own
    from modelpack.monitor import probabilities

    labels = len(pack.manifest.labels)
    for name, value in answer.items():
        array = np.asarray(value)
        classes = probabilities(array) or (labels and array.shape[1] == labels)
        if array.ndim == 2 and array.shape[1] >= 2 and classes:
            return name, "top1", None
    return next(iter(answer)), "cosine", None


# The optimizer's metrics (``optimize.metrics``) as a shadow measures them on live inputs, where
# there are no labels: accuracy becomes agreement with the live version's top-1.
_SHADOW_METRIC = {
    "top1": "top1",
    "accuracy": "top1",
    "cosine": "cosine",
    "pooled-cosine": "cosine",
    "first-token-cosine": "cosine",
    "token-cosine": "cosine",
    "max-abs": "max_abs",
    "equal": "equal",
}


def _pack_metric(
    pack: Pack, answer: Mapping[str, np.ndarray]
) -> tuple[str, str, float | None] | None:
    """The first deciding metric of the pack's optimization (its signed ``report.json``, the
    chosen candidate's scores) on an output the shadow answers; None when there is none (a pack
    made without ``optimize``, or a user's ``module:function``, never imported on a device)."""
    from modelpack import untrusted_json
    from modelpack.manifest import REPORT_FILE

    if pack.manifest.file(REPORT_FILE) is None:
        return None
    try:
        report = untrusted_json.loads((pack.root / REPORT_FILE).read_bytes())
        chosen = next(c for c in report["candidates"] if c.get("chosen") is True)
        scores = chosen["fidelity"]["scores"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, StopIteration):
        return None  # a report of another layout: judged by shape
    for score in scores if isinstance(scores, list) else []:
        if not isinstance(score, dict) or score.get("decides") is not True:
            continue
        output, name = score.get("output"), str(score.get("metric", "")).partition("@")[0]
        metric = _SHADOW_METRIC.get(name)
        if metric is None or output not in answer:
            continue
        bound = score.get("bound")
        if metric == "max_abs":
            if not isinstance(bound, int | float) or not math.isfinite(bound) or bound < 0:
                continue
            return str(output), metric, float(bound)
        return str(output), metric, None
    return None
