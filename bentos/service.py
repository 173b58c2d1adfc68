"""The BentoML service: any ModelPack from the model store, named by ``EDGEBENTO_MODEL``.

``bentoml serve bentos.service:EdgebentoService`` (from any folder) serves the serving core's
HTTP surface (``POST /predict`` tensor JSON, ``GET /metadata``, the Open Inference Protocol under
``/v2``) beside BentoML's own ``/livez``, ``/readyz`` and ``/metrics``.

The routes are a bare ASGI app mounted on the service rather than ``@bentoml.api``
methods: BentoML validates a body with pydantic before user code sees it, so invalid JSON, an
empty body or a body over the cap would come back in BentoML's shape instead of ours. Batching
is the core's (no waiting window, a bounded queue with deadlines) instead of BentoML's
dispatcher, which made a lone client wait the full window and answered 503 under load when
measured here.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
import time
from collections.abc import Mapping

import bentoml
from starlette.types import Receive, Scope, Send

from bentos import bentoml_fixes, fast_lane, protocol_refusal
from bentos.loop_lag import LoopLag
from bentos.protocol_refusal import Refusal
from bentos.store import load_stored_pack
from bentos.time_limits import REQUEST_LIMITS
from modelpack import PredictorOptions, logs
from modelpack.errors import ConfigError, InputError, OverloadError
from modelpack.metrics import InferenceMetrics
from modelpack.predictor import Predictor
from modelpack.serving.core import TIMEOUT_HEADER, TIMEOUT_MAX_CHARS, ServingCore
from modelpack.serving.kept import keep
from modelpack.serving.limits import ServingLimits
from modelpack.serving.reservation import Reservation
from modelpack.serving.routes import HttpRequest, HttpResponse, admit, early, handle, refuse

bentoml_fixes.install()
# BentoML configured its loggers before importing us: give its handlers our line format.
logs.reformat_handlers("bentoml", "uvicorn.error", "circus")
# uvicorn formats an access line for every response (the client's address, the quoted path)
# whenever its access logger has a handler up the tree, and BentoML's root handler counts as
# one, though the line is never shown. BentoML's own access log (EDGEBENTO_ACCESS_LOG) stays.
if not logging.getLogger("uvicorn.access").handlers:
    logging.getLogger("uvicorn.access").propagate = False
MODEL_TAG = os.environ.get("EDGEBENTO_MODEL", "")
if not MODEL_TAG:
    raise ConfigError(
        "set EDGEBENTO_MODEL to a BentoML model tag (such as tiny:latest) to serve; "
        "'edgebento bento import PACK --pub KEY' puts a pack in the model store"
    )
# The model's thread hands each batch back to Python and needs the GIL for it; under a flood
# the event loop holds the GIL almost all the time, and CPython makes a waiting thread wait a
# full switch interval (5 ms by default) before it may take it. A 1.4 ms model then lost a
# third of its batches. 0.05 ms costs the loop a switch only when the model's thread waits.
sys.setswitchinterval(float(os.environ.get("EDGEBENTO_GIL_SWITCH_MS", "0.05")) / 1000)
GC_THRESHOLDS = (20_000, 20, 50)
# One worker per core by default, as BentoML's "cpu_count" does; each then runs ORT on one thread.
WORKERS = int(os.environ.get("EDGEBENTO_WORKERS", "0")) or os.cpu_count() or 1
# EDGEBENTO_MAX_BATCH is the older name of EDGEBENTO_MAX_BATCH_ROWS.
LIMITS = ServingLimits.from_env(max_batch_rows=int(os.environ.get("EDGEBENTO_MAX_BATCH", "64")))
# Time limits by phase. The body must arrive within LIMITS.body_timeout_s (else 408, the
# client's); the run then has RUN_TIMEOUT_S (else 504 run_timeout, ours), above the core's
# deadline, so the core answers first, with 503, whatever can still be refused. A request's
# limit in all (BentoML's traffic timeout, and the fast lane's) is their sum.
RUN_TIMEOUT_S = max(30, int(LIMITS.deadline_s) + 10)
TIMEOUT_S = LIMITS.body_timeout_s + RUN_TIMEOUT_S


LAG = LoopLag()
# A worker's refusals are written to the metrics shared by the workers this long after the
# first of them, not at the loop's next turn, where the fast lane writes them before every
# scrape the worker serves (another worker's scrape sees them at most this late).
REFUSALS_WRITTEN_EVERY_S = 0.02


def _first_headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """ASGI's header list (names already lower-case) as a mapping; the first of a repeated
    name wins, as in Starlette."""
    headers: dict[str, str] = {}
    for name, value in raw:
        headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))
    return headers


async def read_capped(receive: Receive, headers: Mapping[str, str], cap: int) -> bytearray | None:
    """The body, refused as soon as it passes the cap (before it is all in memory), read into
    one buffer; None when the client went away."""
    declared = headers.get("content-length", "")
    # Its digits alone say it is over the cap: int() of thousands of digits raises.
    if declared.isascii() and declared.isdigit() and (len(declared) > 20 or int(declared) > cap):
        raise InputError(
            f"the request body is {declared} bytes; the cap is {cap}", reason="too_large"
        )
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        if len(body) + len(chunk) > cap:
            raise InputError(f"the request body is over the cap of {cap} bytes", reason="too_large")
        body += chunk
        if not message.get("more_body", False):
            return body


async def _read_body(
    core: ServingCore, method: str, receive: Receive, headers: Mapping[str, str]
) -> bytearray | None:
    """The body within its time limit: a client that sends it too slowly gets 408 (its
    fault, counted), not a run timeout after the whole request's limit."""
    seconds = core.limits.body_timeout_s
    limit = REQUEST_LIMITS.arm(seconds)
    try:
        body = await read_capped(receive, headers, core.limits.max_body_bytes)
    except asyncio.CancelledError:
        if not REQUEST_LIMITS.end(limit):
            raise
        raise InputError(
            f"the request body did not arrive within {seconds:g} s", reason="timeout"
        ) from None
    except BaseException:
        REQUEST_LIMITS.end(limit)
        raise
    REQUEST_LIMITS.end(limit)
    return body


# Looked up once: ``bentoml``'s attributes are lazy, and each access ran its module __getattr__.
current_service = bentoml.get_current_service


def _core() -> ServingCore:
    return current_service().core  # type: ignore[no-any-return]


def _write_counts() -> None:
    """Before a scrape this worker serves: its refusals not yet written."""
    core = getattr(current_service(), "core", None)
    if core is not None:
        core.metrics.write_pending()


async def _answer(core: ServingCore, scope: Scope, receive: Receive) -> HttpResponse | None:
    # The deadline counts the body's upload too, and the time the request waited in its socket
    # before the loop read it (the client's clock started then).
    arrived = time.monotonic() - LAG.behind()
    method, path = scope["method"], scope["path"]
    headers = _first_headers(scope["headers"])
    held = scope.pop(protocol_refusal.HELD, None)
    if held is not None:  # its place, held since its headers: admitted again just below
        held.release()
    try:
        # A request that cannot start in time is refused before its body is read: under a
        # flood that is most requests, and every layer they skip is CPU the model keeps.
        route = admit(core, method, path, headers, arrived)
        body = await _read_body(core, method, receive, headers) if method == "POST" else b""
    except Exception as exc:
        return refuse(core, exc)
    if body is None:
        return None
    return await handle(core, HttpRequest(method, path, headers, body, arrived), route)


JSON = {"content-type": "application/json"}
JSON_HEADER = (b"content-type", b"application/json")


def asgi_headers(answer: HttpResponse) -> list[tuple[bytes, bytes]]:
    """The answer's header list as ``serve`` sends it (and ``early_refusal`` writes it)."""
    if answer.headers == JSON:  # most answers: their header list is not built again
        headers = [JSON_HEADER, (b"content-length", b"%d" % len(answer.body))]
    else:
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers.items()]
        headers.append((b"content-length", b"%d" % len(answer.body)))
    if answer.status == 408:  # the rest of a late body is not read: the connection ends
        headers.append((b"connection", b"close"))
    return headers


async def serve(scope: Scope, receive: Receive, send: Send) -> None:
    """The core's HTTP surface as a bare ASGI app: no router or request objects between
    uvicorn's parser and the core (they cost more than the refusal itself under a flood)."""
    if scope["type"] != "http":
        return
    answer = await _answer(_core(), scope, receive)
    if answer is None:
        return  # the client went away: nobody to answer
    headers = asgi_headers(answer)
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": answer.body})


# Admission reads one header (``ServingCore.refusal``): the protocol's check finds it alone.
TIMEOUT_NAME = TIMEOUT_HEADER.encode()
NO_HEADERS: dict[str, str] = {}  # never written
# Whole refusals as uvicorn writes them, by the core's refusal: under a flood nearly every
# refusal is the same queue_full 503, written from here without building its answer again. A
# deadline refusal names the work ahead: the core keeps one error per message (``refusal``), and
# its answer is kept here too, all of them dropped when ``_REFUSALS_KEPT`` are kept.
_REFUSALS: dict[OverloadError, Refusal] = {}
_REFUSALS_KEPT = 1024
# The mapping ``early`` reads, by the x-timeout-ms value sent: a flood sends the same few.
_TIMEOUTS: dict[bytes, dict[str, str]] = {}
_TIMEOUTS_KEPT = 64
# The core's queue_full refusal (``ServingCore.queue_full``, one instance) and its answer.
_last_queue_full: tuple[OverloadError, Refusal] | None = None


def early_refusal(
    method: str, path: str, raw: list[tuple[bytes, bytes]]
) -> Refusal | Reservation | None:
    """The 503 ``serve`` would answer from this request's headers, counted and built as
    ``serve`` builds it, for ``protocol_refusal`` to write before uvicorn builds the request;
    for an inference it admits, a Reservation of its place in the queue (``serve`` releases it
    as it admits the request again); None for anything else."""
    global _last_queue_full
    if not fast_lane.in_lane(path):
        return None
    headers = NO_HEADERS
    for name, value in raw:
        if name == TIMEOUT_NAME:  # the first, as in _first_headers
            found = _TIMEOUTS.get(value) if len(value) <= TIMEOUT_MAX_CHARS else None
            if found is None:
                found = {TIMEOUT_HEADER: value.decode("latin-1")}
                if len(value) <= TIMEOUT_MAX_CHARS:  # longer: refused as unparsable, not kept
                    keep(_TIMEOUTS, value, found, _TIMEOUTS_KEPT)
            headers = found
            break
    core = _core()
    exc = early(core, method, path, headers, time.monotonic() - LAG.behind())
    if not isinstance(exc, OverloadError):
        return exc
    core.metrics.overloaded(exc.reason)  # what count_error does for an OverloadError
    last = _last_queue_full
    if last is not None and last[0] is exc:  # the core's one queue_full refusal: most of them
        return last[1]
    built = _REFUSALS.get(exc)
    if built is None:
        answer = refuse(core, exc, counted=False)
        built = (answer.status, protocol_refusal.header_block(asgi_headers(answer)), answer.body)
        keep(_REFUSALS, exc, built, _REFUSALS_KEPT)
    if exc is core.queue_full:
        _last_queue_full = (exc, built)
    return built


def batch_scheduling() -> bool:
    """Put the calling thread (the event loop's) and every thread it starts later (the model's)
    under Linux's SCHED_BATCH: a thread that wakes then waits for the running one's slice to end
    instead of preempting it. The loop wakes two or three times a request; preempting the
    model's thread each time cost both of them their caches. Profiled on MiniLM with a worker
    per core, the loop's CPU a request fell by a fifth; the MiniLM benchmark measures the
    throughput both ways. A thread that wakes to an idle core still runs at once, so a lone
    client waits no longer.
    ``EDGEBENTO_SCHED_BATCH=0`` leaves the scheduler's default."""
    if os.environ.get("EDGEBENTO_SCHED_BATCH", "1") == "0" or not hasattr(os, "SCHED_BATCH"):
        return False
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError:  # a sandbox that forbids it: the default policy serves as well, if slower
        return False
    return True


def _options() -> PredictorOptions:
    # One ORT thread per worker when there are several, so workers do not fight for cores.
    default = "1" if WORKERS > 1 else "0"
    return PredictorOptions(intra_op_threads=int(os.environ.get("EDGEBENTO_THREADS", default)))


@bentoml.asgi_app(serve, path="/")
@bentoml.service(
    name="edgebento",
    workers=WORKERS,
    traffic={"timeout": TIMEOUT_S},
    logging={"access": {"enabled": os.environ.get("EDGEBENTO_ACCESS_LOG", "0") == "1"}},
    tracing={"excluded_urls": os.environ.get("EDGEBENTO_UNTRACED", "/predict,/metadata,/v2")},
)
class EdgebentoService:
    """Serves the pack stored as ``EDGEBENTO_MODEL``, re-verified against its trusted key."""

    model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        batch_scheduling()  # BentoML builds the service on the event loop's thread
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
        # A request allocates hundreds of objects, so at Python's default (a young collection
        # every 700) a flood ran a hundred collections a second, each with the GIL held, and
        # the model's thread waited behind them: goodput was 79% of capacity, 82-95% with this.
        gc.set_threshold(*GC_THRESHOLDS)
        if fast_lane.taken():  # each scrape this worker serves writes its counts first
            self.core.metrics.write_refusals_every(REFUSALS_WRITTEN_EVERY_S)

    @bentoml.on_shutdown
    def write_counts(self) -> None:
        """The refusals counted and not yet written (``write_refusals_every``)."""
        self.core.metrics.write_pending()


if os.environ.get("EDGEBENTO_FAST_LANE", "1") != "0":
    fast_lane.install(
        EdgebentoService,
        serve,
        TIMEOUT_S,
        lambda: _core().metrics.failed("run_timeout"),
        early_refusal if os.environ.get("EDGEBENTO_PROTOCOL_REFUSAL", "1") != "0" else None,
        _write_counts,
    )
