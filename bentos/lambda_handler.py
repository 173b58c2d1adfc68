"""``handler(event, context)``: the pack served Lambda-style, with the service's contract.

Configured by the environment:

- ``EDGEBENTO_PACK``: a local pack directory (baked into the image), or
- ``EDGEBENTO_PACK_URL``: ``s3://bucket/key.tar.gz`` (a pack archive) or ``s3://bucket/prefix/``
  (a pack directory), fetched once through cloud_sync's store (boto3) and cached under
  ``EDGEBENTO_CACHE`` (default ``/tmp/edgebento``);
- ``EDGEBENTO_TRUST``: the public key file the pack must be signed by (required).

The pack is verified and loaded once per execution environment (at import on AWS, otherwise on
the first call). This module keeps its imports light (no bentoml, boto3 only for s3://), since
import plus load is the cold start.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bentos.endpoint import Answer, ModelEndpoint
from bentos.lambda_events import event_source, http_request, http_response
from modelpack import Pack, extract_archive, load_pack
from modelpack.errors import ConfigError, EdgebentoError, InputError, PackError, StoreError
from modelpack.metrics import InferenceMetrics

_lock = threading.Lock()
_endpoint: ModelEndpoint | None = None
_registry: Any = None  # the prometheus_client registry of this environment's metrics


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


def get_endpoint() -> ModelEndpoint:
    global _endpoint, _registry
    with _lock:
        if _endpoint is None:
            from prometheus_client import CollectorRegistry

            _registry = CollectorRegistry()
            metrics = InferenceMetrics(registry=_registry)
            _endpoint = ModelEndpoint(resolve_pack(), metrics=metrics, batching=False)
        return _endpoint


def reset() -> None:
    """Forget the loaded pack (a new cold start on the next call)."""
    global _endpoint
    with _lock:
        _endpoint = None


def _metrics_text() -> str:
    from prometheus_client import generate_latest

    return generate_latest(_registry).decode()


def _route(endpoint: ModelEndpoint, method: str, path: str, body: bytes | None) -> Answer:
    if method == "GET" and path.rstrip("/").endswith("/metadata"):
        return Answer(200, endpoint.metadata())
    if method == "GET" and path.rstrip("/").endswith(("/livez", "/readyz")):
        return Answer(200, {"status": "ok"})
    if method != "POST":
        return Answer(405, {"error": f"{method} {path}: use POST /predict", "reason": "method"})
    return endpoint.predict_sync(body)


def handler(event: Any, context: Any = None) -> dict[str, Any]:
    """Direct invocation: the request JSON in, the answer JSON out (errors as
    ``{"error", "reason", "statusCode"}``). HTTP events: ``statusCode``, headers, JSON body."""
    endpoint = get_endpoint()
    source = event_source(event)
    if source == "direct":
        answer = endpoint.predict_sync(event, parsed=True)
        if answer.status != 200:
            return {**answer.body, "statusCode": answer.status}
        return answer.body
    assert isinstance(event, Mapping)
    try:
        request = http_request(event, source)
    except InputError as exc:
        answer = endpoint.refuse(exc)
        return http_response(source, answer.status, answer.body)
    if request.method == "GET" and request.path.rstrip("/").endswith("/metrics"):
        return http_response(source, 200, _metrics_text(), "text/plain; version=0.0.4")
    try:
        answer = _route(endpoint, request.method, request.path, request.body)
    except EdgebentoError as exc:  # never reached in practice: predict_sync answers all
        answer = Answer(500, {"error": str(exc), "reason": "internal"})
    return http_response(source, answer.status, answer.body)


if os.environ.get("AWS_LAMBDA_FUNCTION_NAME") and (
    os.environ.get("EDGEBENTO_PACK") or os.environ.get("EDGEBENTO_PACK_URL")
):
    get_endpoint()  # load during the init phase, as Lambda intends
