"""``ServedModel.metadata()["batches"]`` counts what ``edgebento_batch_size`` observes, on both
paths of the core: queued and batched (BentoML; a batch the model refuses is run again member
by member, which is no new run of the count) and one request at a time (the agent, Lambda), on
random mixes of valid requests and requests refused before or by the model."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from modelpack import create_pack, load_pack
from modelpack.metrics import InferenceMetrics
from modelpack.predictor import Predictor
from modelpack.serving.core import ServingCore
from modelpack.serving.limits import ServingLimits
from modelpack.serving.routes import HttpRequest, HttpResponse, handle, handle_sync
from tests.support import serving_models
from tests.unit.modelpack.test_serving_core import _body


@pytest.fixture(scope="module")
def counted(
    tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]
) -> tuple[ServingCore, CollectorRegistry]:
    work = tmp_path_factory.mktemp("add")
    create_pack(
        serving_models.add_two(work / "add.onnx"), work / "add", name="add", version=1, key=keys[0]
    )
    registry = CollectorRegistry()
    core = ServingCore(ServingLimits(max_batch_rows=8), InferenceMetrics(registry=registry))
    pack = load_pack(work / "add", [keys[1]])
    core.serve(Predictor.from_pack(pack), pack.manifest)
    return core, registry


def _both(core: ServingCore, registry: CollectorRegistry) -> tuple[dict[str, int], tuple[int, int]]:
    """(metadata's batches, the histogram's count and sum), as the process has them now."""
    assert core.model is not None
    count = registry.get_sample_value("edgebento_batch_size_count") or 0
    total = registry.get_sample_value("edgebento_batch_size_sum") or 0
    return core.model.metadata()["batches"], (int(count), int(total))


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(bodies=st.lists(_body(), min_size=1, max_size=20), queued=st.booleans())
def test_metadata_counts_the_runs_and_rows_the_metric_observes(
    counted: tuple[ServingCore, CollectorRegistry], bodies: list[bytes], queued: bool
) -> None:
    core, registry = counted
    (meta, metric) = _both(core, registry)
    assert (meta["count"], meta["rows"]) == metric

    async def together() -> list[HttpResponse]:
        return await asyncio.gather(
            *(handle(core, HttpRequest("POST", "/predict", {}, b)) for b in bodies)
        )

    if queued:
        asyncio.run(together())
    else:
        for body in bodies:
            handle_sync(core, HttpRequest("POST", "/predict", {}, body))
    (after, metric_after) = _both(core, registry)
    assert (after["count"], after["rows"]) == metric_after
