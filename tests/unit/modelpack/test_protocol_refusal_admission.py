"""``routes.early`` (what uvicorn's protocol asks, ``bentos/protocol_refusal.py``) returns the
OverloadError ``routes.admit`` raises, for the same request and queue; a place held in the queue
where admit lets an inference through; and nothing where admit leaves it to ``handle``."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelpack.errors import OverloadError
from modelpack.manifest import TensorSpec
from modelpack.predictor import Predictor
from modelpack.serving.core import ServingCore
from modelpack.serving.limits import ServingLimits
from modelpack.serving.reservation import Reservation
from modelpack.serving.routes import admit, early
from tests.support import serving_models

SPEC = ["batch", 4]


def _core(tmp_path: Path, max_queue: int) -> ServingCore:
    core = ServingCore(ServingLimits(max_queue=max_queue, deadline_s=2.0))
    inputs = [TensorSpec(name=n, dtype="float32", shape=SPEC) for n in ("a", "b")]
    outputs = [TensorSpec(name="y", dtype="float32", shape=SPEC)]
    core.serve(Predictor(serving_models.add_two(tmp_path / "add.onnx"), inputs, outputs))
    return core


@pytest.fixture(scope="module")
def cores(tmp_path_factory: pytest.TempPathFactory) -> dict[int, ServingCore]:
    return {q: _core(tmp_path_factory.mktemp(f"queue-{q}"), q) for q in (0, 8)}


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    max_queue=st.sampled_from([0, 8]),
    busy_s=st.sampled_from([0.0, 0.5, 5.0]),  # the running batch's rest: none, within, past
    timeout=st.sampled_from([None, "0.001", "5000", "soon", "1e400", "-3"]),
    method=st.sampled_from(["POST", "GET"]),
    path=st.sampled_from(["/predict", "/v2/models/add/infer", "/v2/models/other/infer", "/x"]),
)
def test_early_is_what_admit_raises_or_a_place_for_what_it_admits(
    cores: dict[int, ServingCore],
    max_queue: int,
    busy_s: float,
    timeout: str | None,
    method: str,
    path: str,
) -> None:
    core = cores[max_queue]
    batcher = core.live().batcher
    batcher.cost.observe(1, 0.001)
    headers = {} if timeout is None else {"x-timeout-ms": timeout}
    arrived = time.monotonic()
    batcher._busy_until = arrived + busy_s
    try:
        admitted = admit(core, method, path, headers, arrived)
    except OverloadError as exc:
        raised: OverloadError | None = exc
    else:
        raised = None
    found = early(core, method, path, headers, arrived)
    batcher._busy_until = 0.0
    if raised is None:
        if admitted is None:  # not an inference, or a fault of its own: handle answers it
            assert found is None or isinstance(found, Reservation)
        else:
            assert isinstance(found, Reservation)
        if isinstance(found, Reservation):
            assert batcher.reserved == 1
            found.release()
        assert batcher.reserved == 0
        return
    assert isinstance(found, OverloadError)
    assert (found.reason, found.retry_after_s) == (raised.reason, raised.retry_after_s)
    assert found.args[0].split(" ", 4)[:4] == raised.args[0].split(" ", 4)[:4]


def test_a_full_queue_is_refused_with_one_error_that_is_never_raised(
    cores: dict[int, ServingCore],
) -> None:
    """Under a flood most refusals are queue_full, whatever the request's own deadline: the
    check returns the core's one instance (not one built per refusal); ``admit``, which raises,
    raises an error of its own each time, so no traceback is chained onto the shared one."""
    core = cores[0]  # a queue of 0: always full
    arrived = time.monotonic()
    refusals = [
        early(core, "POST", "/predict", headers, arrived)
        for headers in ({}, {"x-timeout-ms": "5000"}, {"x-timeout-ms": "0.001"}, {})
    ]
    assert all(r is core.queue_full for r in refusals)
    assert core.queue_full.reason == "queue_full"
    raised = []
    for _ in range(2):
        with pytest.raises(OverloadError) as caught:
            admit(core, "POST", "/predict", {}, arrived)
        raised.append(caught.value)
    assert raised[0] is not raised[1] and core.queue_full not in raised
    assert core.queue_full.__traceback__ is None
    assert str(raised[0]) == str(core.queue_full)
