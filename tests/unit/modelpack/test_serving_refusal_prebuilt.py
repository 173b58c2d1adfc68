"""A refusal's answer built from its prebuilt parts is the one ``HttpResponse.json`` writes, and
its counts are the same: under a flood most answers take this path (issue 22). A batch's queue
waits written at once count as they would one by one."""

from __future__ import annotations

import math

import prometheus_client
from hypothesis import given, settings
from hypothesis import strategies as st

from modelpack.errors import OverloadError
from modelpack.metrics import LATENCY_BUCKETS, InferenceMetrics
from modelpack.serving.core import ServingCore
from modelpack.serving.reasons import error_doc, message_of, retry_headers, status_of
from modelpack.serving.routes import HttpResponse, admit, match, refuse


@settings(max_examples=60, deadline=None)
@given(
    message=st.text(max_size=80),
    reason=st.sampled_from(["queue_full", "deadline", "internal", "made_up"]),
    retry=st.integers(0, 3600),
)
def test_an_overload_answer_is_the_document_as_json_writes_it(
    message: str, reason: str, retry: int
) -> None:
    core = ServingCore()
    for _ in range(2):  # built, then from what was kept
        exc = OverloadError(message, reason=reason, retry_after_s=retry)
        got = refuse(core, exc)
        want = HttpResponse.json(status_of(exc), error_doc(exc), retry_headers(exc))
        assert (got.status, got.body, got.headers) == (want.status, want.body, want.headers)
        assert got.doc() == {"error": message_of(exc), "reason": reason, "retry_after_s": retry}
    got.headers["x-changed"] = "1"  # a caller's change to one answer is not the next one's
    assert "x-changed" not in refuse(core, exc).headers


def test_overload_counts_stay_exact() -> None:
    registry = prometheus_client.CollectorRegistry()
    core = ServingCore(metrics=InferenceMetrics(registry=registry))
    for reason, times in (("deadline", 3), ("queue_full", 2)):
        for _ in range(times):
            refuse(core, OverloadError("busy", reason=reason))

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("edgebento_overload_rejected_total", reason="deadline") == 3
    assert value("edgebento_overload_rejected_total", reason="queue_full") == 2
    assert value("edgebento_requests_total", outcome="overloaded") == 5


def test_admit_answers_a_path_as_match_does_every_time() -> None:
    core = ServingCore()  # no model: every inference path is left to handle (None)
    for _ in range(2):
        assert admit(core, "POST", "/predict", {}, 0.0) is None
        assert admit(core, "GET", "/nope", {}, 0.0) is None
    assert match("POST", "/predict").infer == "tensor"


@settings(max_examples=60, deadline=None)
@given(
    waits=st.lists(
        st.one_of(
            st.sampled_from([0.0, *LATENCY_BUCKETS]),  # on a bound: the bucket it closes
            st.floats(-1.0, 100.0, allow_nan=False),
            st.just(float("nan")),
        ),
        max_size=20,
    )
)
def test_a_batch_of_waits_counts_as_its_waits_one_by_one(waits: list[float]) -> None:
    one, many = prometheus_client.CollectorRegistry(), prometheus_client.CollectorRegistry()
    by_one = InferenceMetrics(registry=one)
    at_once = InferenceMetrics(registry=many)
    for wait in waits:
        by_one.queue_wait(wait)
    at_once.queue_waits(waits)

    def samples(registry: prometheus_client.CollectorRegistry) -> dict[str, float]:
        return {
            s.name + str(sorted(s.labels.items())): s.value
            for metric in registry.collect()
            if metric.name == "edgebento_queue_wait_seconds"
            for s in metric.samples
            if not s.name.endswith("_created")
        }

    want, got = samples(one), samples(many)
    total = "edgebento_queue_wait_seconds_sum[]"
    got_sum, want_sum = got.pop(total), want.pop(total)
    assert math.isclose(got_sum, want_sum, abs_tol=1e-9) or (
        math.isnan(got_sum) and math.isnan(want_sum)
    )
    assert got == want  # every bucket and the count exactly
