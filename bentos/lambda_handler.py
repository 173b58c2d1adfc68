"""``handler(event, context)``: the pack served Lambda-style, with the service's contract.

Configured by the environment:

- ``EDGEBENTO_PACK``: a local pack directory (baked into the image), or
- ``EDGEBENTO_PACK_URL``: ``s3://bucket/key.tar.gz`` (a pack archive) or ``s3://bucket/prefix/``
  (a pack directory), fetched once through cloud_sync's store (boto3) and cached under
  ``EDGEBENTO_CACHE`` (default ``/tmp/edgebento``);
- ``EDGEBENTO_TRUST``: the public key file the pack must be signed by (required).

The pack is verified and loaded once per execution environment (at import on AWS, otherwise on
the first call). A load that fails is answered 503 ``load_failed`` with the reason, and is not
tried again for ``EDGEBENTO_LOAD_RETRY_S``; no exception leaves the handler. Requests go through
the serving core (tensor JSON and the Open Inference Protocol); the public HTTP API serves no
``/metrics`` (a direct ``{"metrics": true}`` invocation does). This module keeps its imports
light (no bentoml, boto3 only for s3://), since import plus load is the cold start.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bentos.lambda_events import Source, event_source, http_request, http_response
from modelpack import Pack, extract_archive, load_pack
from modelpack.errors import ConfigError, EdgebentoError, PackError, StoreError
from modelpack.metrics import InferenceMetrics
from modelpack.predictor import Predictor
from modelpack.serving.core import ServingCore
from modelpack.serving.limits import ServingLimits
from modelpack.serving.reasons import error_doc, status_of
from modelpack.serving.routes import HttpResponse, handle_sync, refuse

log = logging.getLogger(__name__)

_lock = threading.Lock()
_core: ServingCore | None = None
_registry: Any = None  # the prometheus_client registry of this environment's metrics
_failed_at: float | None = None  # when the last load failed (it is not retried before RETRY_S)
RETRY_S = float(os.environ.get("EDGEBENTO_LOAD_RETRY_S", "60"))


def _cache_dir(url: str) -> Path:
    root = Path(os.environ.get("EDGEBENTO_CACHE", "/tmp/edgebento"))
    return root / hashlib.sha256(url.encode()).hexdigest()[:16]


def download_pack(url: str, target: Path) -> Path:
    """Fetch a pack (``.tar.gz`` archive or directory prefix) from an object store URL into
    ``target``, through cloud_sync's store (boto3 for ``s3://``); returns the pack dir."""
    from cloud_sync.store import open_store

    staging = target.with_name(target.name + ".part")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        if url.endswith((".tar.gz", ".tgz")):
            parent, _, name = url.rpartition("/")
            archive = open_store(parent).get_file(name, staging / "pack.tar.gz")
            extract_archive(archive, staging / "pack")
            archive.unlink()
        else:
            store = open_store(url)
            keys = store.list()
            if not keys:
                raise StoreError(f"nothing is stored under {url}")
            for key in keys:  # the store refuses keys with '..' or a leading '/'
                store.get_file(key, staging / "pack" / key)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target / "pack"


def _trusted() -> list[str]:
    trust = os.environ.get("EDGEBENTO_TRUST", "")
    if not trust:
        raise ConfigError("set EDGEBENTO_TRUST to the public key file the pack is signed by")
    return [trust]


def resolve_pack() -> Pack:
    """The verified pack the environment names; a cached download is re-verified, not trusted."""
    trusted = _trusted()
    # The publisher ran onnx.checker and signed the result; the runtime image has no onnx.
    local = os.environ.get("EDGEBENTO_PACK", "")
    if local:
        return load_pack(local, trusted, check_model=False)
    url = os.environ.get("EDGEBENTO_PACK_URL", "")
    if not url:
        raise ConfigError("set EDGEBENTO_PACK (a pack directory) or EDGEBENTO_PACK_URL (s3://...)")
    cache = _cache_dir(url)
    if (cache / "pack").is_dir():
        try:
            return load_pack(cache / "pack", trusted, check_model=False)
        except PackError:
            pass  # a stale or damaged cache: fetch it again
    return load_pack(download_pack(url, cache), trusted, check_model=False)


def _load(core: ServingCore) -> None:
    global _failed_at
    try:
        pack = resolve_pack()
        predictor = Predictor.from_pack(pack)
    except Exception as exc:  # boto3, a bad pack, a bad setting: all answered, none raised
        _failed_at = time.monotonic()
        message = str(exc) if isinstance(exc, EdgebentoError) else f"{type(exc).__name__}: {exc}"
        core.load_error = f"the pack could not be loaded: {message}"
        log.error("%s (not retried for %.0f s)", core.load_error, RETRY_S)
        return
    about = {"manifest_sha256": pack.manifest_sha256, "signed_by": pack.signed_by}
    samples = pack.samples
    core.serve(predictor, pack.manifest, about, samples.inputs if samples is not None else None)


def get_core() -> ServingCore:
    """This environment's core, its pack loaded once; a failed load is remembered (and
    answered as 503 ``load_failed``) for ``EDGEBENTO_LOAD_RETRY_S`` instead of being fetched
    again on every invocation."""
    global _core, _registry
    with _lock:
        if _core is None:
            from prometheus_client import CollectorRegistry

            _registry = CollectorRegistry()
            _core = ServingCore(
                ServingLimits.from_env(), InferenceMetrics(registry=_registry), batching=False
            )
        retry = _failed_at is None or time.monotonic() - _failed_at >= RETRY_S
        if _core.model is None and retry:
            _load(_core)
        return _core


def reset() -> None:
    """Forget the loaded pack and any remembered failure (a new cold start on the next call)."""
    global _core, _failed_at
    with _lock:
        _core, _failed_at = None, None


def metrics_text() -> str:
    """The Prometheus text of this environment (a direct ``{"metrics": true}`` invocation,
    which needs lambda:InvokeFunction; the public HTTP API never serves it)."""
    from prometheus_client import generate_latest

    get_core()
    return generate_latest(_registry).decode()


def _fault(exc: BaseException) -> dict[str, Any]:
    """An error document that any JSON writer can encode: a message never carries a lone
    surrogate (the runtime writes UTF-8), whatever text the client sent."""
    doc = {**error_doc(exc), "statusCode": status_of(exc)}
    doc["error"] = doc["error"].encode("utf-8", "backslashreplace").decode("utf-8")
    return doc


def _direct(core: ServingCore, event: Any) -> Any:
    if isinstance(event, Mapping) and event.get("metrics") is True:
        return {"metrics": metrics_text()}
    try:
        return core.infer_doc(event)
    except EdgebentoError as exc:
        return _fault(exc)
    except Exception as exc:  # a fault of ours: answered, never raised to the runtime
        log.error("invocation failed: %s", exc, exc_info=exc)
        core.count_error(exc)
        return _fault(exc)


def _handle(event: Any, source: Source) -> Any:
    core = get_core()
    if source == "direct":
        return _direct(core, event)
    multi = isinstance(event, Mapping) and isinstance(event.get("multiValueHeaders"), Mapping)
    try:
        request = http_request(event, source)
    except EdgebentoError as exc:
        return http_response(source, refuse(core, exc), multi)
    return http_response(source, handle_sync(core, request), multi)


def handler(event: Any, context: Any = None) -> Any:
    """Direct invocation: the request JSON in (tensor JSON or OIP), the answer JSON out (errors
    as ``{"error", "reason", "statusCode"}``). HTTP events: ``statusCode``, headers, a body.
    No exception leaves it, whatever the event: a fault of ours is a 500 in the event's shape."""
    source: Source = "direct"
    try:
        source = event_source(event)
        return _handle(event, source)
    except Exception as exc:
        log.error("invocation failed: %s", exc, exc_info=exc)
        if _core is not None:
            _core.count_error(exc)
        if source == "direct":
            return _fault(exc)
        return http_response(source, HttpResponse.json(status_of(exc), error_doc(exc)))


if os.environ.get("AWS_LAMBDA_FUNCTION_NAME") and (
    os.environ.get("EDGEBENTO_PACK") or os.environ.get("EDGEBENTO_PACK_URL")
):
    get_core()  # load during the init phase, as Lambda intends
