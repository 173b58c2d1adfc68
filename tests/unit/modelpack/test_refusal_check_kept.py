"""The early check's refusals kept built (issue 22): a deadline refusal is the error
``refuse_late`` builds, with the same message, reason and Retry-After, built once per message
and never raised; a client's x-timeout-ms parsed once per value, refused every time it is
invalid. What is kept stays bounded."""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelpack.errors import InputError, OverloadError
from modelpack.manifest import TensorSpec
from modelpack.predictor import Predictor
from modelpack.serving import core as core_module
from modelpack.serving.core import LATE_REFUSALS_KEPT, ServingCore
from modelpack.serving.limits import ServingLimits
from modelpack.serving.routes import admit, early
from tests.support import serving_models

SPEC = ["batch", 4]


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> ServingCore:
    core = ServingCore(ServingLimits(max_queue=8, deadline_s=2.0, max_queue_wait_s=1e9))
    inputs = [TensorSpec(name=n, dtype="float32", shape=SPEC) for n in ("a", "b")]
    outputs = [TensorSpec(name="y", dtype="float32", shape=SPEC)]
    path = serving_models.add_two(tmp_path_factory.mktemp("kept") / "add.onnx")
    core.serve(Predictor(path, inputs, outputs))
    return core


def _work_ahead(core: ServingCore, rows: int, per_row_s: float) -> None:
    """A queue whose work ahead is ``rows * per_row_s`` (no batch running: the message does
    not move with the clock)."""
    batcher = core.live().batcher
    batcher.cost.observe(1, 0.001)
    batcher._busy_until = 0.0
    batcher._queued_rows, batcher.per_row_s = rows, per_row_s
    batcher.reserved = 1  # a place held: not idle, and the queue is not full


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.integers(0, 4000),
    per_row_s=st.sampled_from([0.0, 0.00025, 0.001, 0.0137]),
    retry=st.sampled_from([1, 7]),
)
def test_a_deadline_refusal_is_refuse_lates_error_built_once(
    core: ServingCore, rows: int, per_row_s: float, retry: int
) -> None:
    _work_ahead(core, rows, per_row_s)
    batcher = core.live().batcher
    batcher.retry_after_s = retry
    headers = {"x-timeout-ms": "0.001"}
    arrived = time.monotonic()
    try:
        found = early(core, "POST", "/predict", headers, arrived)
        again = early(core, "POST", "/predict", headers, arrived)
        built = batcher.refuse_late()
        with pytest.raises(OverloadError) as raised:
            admit(core, "POST", "/predict", headers, arrived)
    finally:
        batcher.reserved, batcher._queued_rows, batcher.retry_after_s = 0, 0, 1
    assert isinstance(found, OverloadError)
    # What the check built before: the same message, reason and Retry-After.
    assert (str(found), found.reason, found.retry_after_s) == (
        str(built),
        "deadline",
        retry,
    )
    assert str(raised.value) == str(found)
    assert again is found  # built once for its message
    assert raised.value is not found and found.__traceback__ is None  # never raised


def test_the_late_refusals_kept_stay_bounded(core: ServingCore) -> None:
    kept = []
    try:
        for rows in range(LATE_REFUSALS_KEPT + 10):
            _work_ahead(core, rows, 0.001)  # a message per row (and the place held): 0.001 s, ...
            found = core.refusal(core.live(), {"x-timeout-ms": "0.001"}, time.monotonic())
            assert isinstance(found, OverloadError)
            assert str(found).startswith(f"the work ahead would take {(rows + 1) / 1000:.3f} s")
            kept.append(len(core._late))
    finally:
        batcher = core.live().batcher
        batcher.reserved, batcher._queued_rows = 0, 0
    assert max(kept) <= LATE_REFUSALS_KEPT


@settings(max_examples=200, deadline=None)
@given(
    raw=st.one_of(
        st.sampled_from(["0.001", "5000", "1e400", "-3", "nan", "soon", "1" * 65, " 12 ", ""]),
        st.text(max_size=20),
        st.floats(allow_nan=True).map(str),
    )
)
def test_a_timeout_is_parsed_the_same_every_time(raw: str) -> None:
    def parsed() -> float | str | None:
        try:
            return core_module._timeout_header({"x-timeout-ms": raw})
        except InputError as exc:
            return f"refused: {exc.reason}"

    want: float | str
    try:
        want = core_module._parsed_timeout(raw)
    except InputError as exc:
        want = f"refused: {exc.reason}"
    assert parsed() == want
    assert parsed() == want  # kept (or refused again)
    assert len(core_module._PARSED_TIMEOUTS) <= core_module._PARSED_KEPT
