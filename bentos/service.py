"""The BentoML service: any ModelPack from the model store, named by ``EDGEBENTO_MODEL``.

``bentoml serve .`` from the repo root (bentofile.yaml points here) serves the serving core's
HTTP surface (``POST /predict`` tensor JSON, ``GET /metadata``, the Open Inference Protocol under
``/v2``) beside BentoML's own ``/livez``, ``/readyz`` and ``/metrics``.

The routes are a small Starlette app mounted on the service rather than ``@bentoml.api``
methods: BentoML validates a body with pydantic before user code sees it, so invalid JSON, an
empty body or a body over the cap would come back in BentoML's shape instead of ours. Batching
is the core's (no waiting window, a bounded queue with deadlines) instead of BentoML's
dispatcher, which made a lone client wait the full window and answered 503 under load when
measured here.
"""

from __future__ import annotations

import gc
import os
import time

import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bentos.store import load_stored_pack
from modelpack import PredictorOptions, logs
from modelpack.errors import ConfigError, InputError
from modelpack.metrics import InferenceMetrics
from modelpack.predictor import Predictor
from modelpack.serving.core import ServingCore
from modelpack.serving.limits import ServingLimits
from modelpack.serving.routes import HttpRequest, handle, refuse

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
# EDGEBENTO_MAX_BATCH is the older name of EDGEBENTO_MAX_BATCH_ROWS.
LIMITS = ServingLimits.from_env(max_batch_rows=int(os.environ.get("EDGEBENTO_MAX_BATCH", "64")))


async def read_capped(request: Request, cap: int) -> bytearray:
    """The body, refused as soon as it passes the cap (before it is all in memory), read into
    one buffer: a list of chunks joined at the end would hold the body twice."""
    declared = request.headers.get("content-length", "")
    # Its digits alone say it is over the cap: int() of thousands of digits raises.
    if declared.isascii() and declared.isdigit() and (len(declared) > 20 or int(declared) > cap):
        raise InputError(
            f"the request body is {declared} bytes; the cap is {cap}", reason="too_large"
        )
    body = bytearray()
    async for chunk in request.stream():
        if len(body) + len(chunk) > cap:
            raise InputError(f"the request body is over the cap of {cap} bytes", reason="too_large")
        body += chunk
    return body


def _core() -> ServingCore:
    return bentoml.get_current_service().core  # type: ignore[no-any-return]


async def serve(request: Request) -> Response:
    arrived = time.monotonic()  # the deadline counts the body's upload too
    core = _core()
    try:
        body = (
            await read_capped(request, core.limits.max_body_bytes)
            if request.method == "POST"
            else b""
        )
    except InputError as exc:
        answer = refuse(core, exc)
    else:
        answer = await handle(
            core, HttpRequest(request.method, request.scope["path"], request.headers, body, arrived)
        )
    return Response(answer.body, answer.status, answer.headers)


routes = Starlette(
    routes=[
        # Every method reaches the core, so a wrong one gets its JSON 405 (Starlette's own is
        # plain text); HEAD comes with GET.
        Route(path, serve, methods=["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
        for path in ("/predict", "/metadata", "/v2", "/v2/{rest:path}")
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
    # BentoML's own timeout stays above the core's deadline: the core answers first, with 503.
    traffic={"timeout": max(30, int(LIMITS.deadline_s) + 10)},
    logging={"access": {"enabled": os.environ.get("EDGEBENTO_ACCESS_LOG", "0") == "1"}},
    tracing={"excluded_urls": os.environ.get("EDGEBENTO_UNTRACED", "/predict,/metadata,/v2")},
)
class EdgebentoService:
    """Serves the pack stored as ``EDGEBENTO_MODEL``, re-verified against its trusted key."""

    model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        pack = load_stored_pack(self.model.path)
        self.core = ServingCore(LIMITS, InferenceMetrics(lib=bentoml.metrics))
        about = {"manifest_sha256": pack.manifest_sha256, "signed_by": pack.signed_by}
        samples = pack.samples
        self.core.serve(
            Predictor.from_pack(pack, _options()),
            pack.manifest,
            about,
            samples.inputs if samples is not None else None,
        )
        # Everything loaded so far lives as long as the worker: keep it out of the collector's
        # full passes, which otherwise scan BentoML's whole import graph and stall requests.
        gc.collect()
        gc.freeze()
