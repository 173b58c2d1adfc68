"""The BentoML service: any ModelPack from the model store, named by ``EDGEBENTO_MODEL``.

``bentoml serve .`` from the repo root (bentofile.yaml points here) serves ``POST /predict``
(tensor JSON), ``GET /metadata`` and BentoML's own ``/livez``, ``/readyz`` and ``/metrics``.

The two routes are a small Starlette app mounted on the service rather than ``@bentoml.api``
methods: BentoML validates a body with pydantic before user code sees it, so invalid JSON, an
empty body or a body over the cap would come back in BentoML's shape instead of ours. Batching
is ``bentos.batching`` (no waiting window) instead of BentoML's dispatcher, which made a lone
client wait the full window and answered 503 under load when measured here.
"""

from __future__ import annotations

import gc
import os
from typing import Any

import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bentos.endpoint import ModelEndpoint
from bentos.store import load_stored_pack
from modelpack import PredictorOptions, logs
from modelpack.codec import MAX_BODY_BYTES
from modelpack.errors import ConfigError, InputError
from modelpack.metrics import InferenceMetrics

# BentoML configured its loggers before importing us: give its handlers our line format.
logs.reformat_handlers("bentoml", "uvicorn.error", "circus")
MODEL_TAG = os.environ.get("EDGEBENTO_MODEL", "")
if not MODEL_TAG:
    raise ConfigError(
        "set EDGEBENTO_MODEL to a BentoML model tag (such as tiny:latest) to serve; "
        "'edgebento bento import PACK --pub KEY' puts a pack in the model store"
    )
# One worker per core by default, as BentoML's "cpu_count" does; each then runs ORT on one thread.
WORKERS = int(os.environ.get("EDGEBENTO_WORKERS", "0")) or os.cpu_count() or 1
MAX_BODY = int(os.environ.get("EDGEBENTO_MAX_BODY_BYTES", str(MAX_BODY_BYTES)))


async def read_capped(request: Request, cap: int) -> bytes:
    """The body, refused as soon as it passes the cap (before it is all in memory)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise InputError(
            f"the request body is {declared} bytes; the cap is {cap}", reason="too_large"
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise InputError(f"the request body is over the cap of {cap} bytes", reason="too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _endpoint() -> ModelEndpoint:
    return bentoml.get_current_service().endpoint  # type: ignore[no-any-return]


async def predict(request: Request) -> JSONResponse:
    endpoint = _endpoint()
    try:
        body = await read_capped(request, endpoint.max_body_bytes)
    except InputError as exc:
        refused = endpoint.refuse(exc)
        return JSONResponse(refused.body, status_code=refused.status)
    answer = await endpoint.predict(body)
    return JSONResponse(answer.body, status_code=answer.status)


async def metadata(_: Request) -> JSONResponse:
    return JSONResponse(_endpoint().metadata())


routes = Starlette(
    routes=[
        Route("/predict", predict, methods=["POST"]),
        Route("/metadata", metadata, methods=["GET"]),
    ]
)


def _options() -> PredictorOptions:
    # One ORT thread per worker when there are several, so workers do not fight for cores.
    default = "1" if WORKERS > 1 else "0"
    return PredictorOptions(intra_op_threads=int(os.environ.get("EDGEBENTO_THREADS", default)))


@bentoml.asgi_app(routes, path="/")
@bentoml.service(
    name="edgebento",
    workers=WORKERS,
    traffic={"timeout": 30},
    logging={"access": {"enabled": os.environ.get("EDGEBENTO_ACCESS_LOG", "0") == "1"}},
    tracing={"excluded_urls": os.environ.get("EDGEBENTO_UNTRACED", "/predict,/metadata")},
)
class EdgebentoService:
    """Serves the pack stored as ``EDGEBENTO_MODEL``, re-verified against its trusted key."""

    model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        pack = load_stored_pack(self.model.path)
        self.endpoint = ModelEndpoint(
            pack,
            metrics=InferenceMetrics(lib=bentoml.metrics),
            options=_options(),
            max_body_bytes=MAX_BODY,
            max_batch_rows=int(os.environ.get("EDGEBENTO_MAX_BATCH", "64")),
        )
        # Everything loaded so far lives as long as the worker: keep it out of the collector's
        # full passes, which otherwise scan BentoML's whole import graph and stall requests.
        gc.collect()
        gc.freeze()

    def info(self) -> dict[str, Any]:
        return self.endpoint.metadata()
