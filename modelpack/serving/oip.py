"""The Open Inference Protocol v2 (KServe, Triton, MLServer) and Triton's binary tensor data
extension, as tritonclient sends it by default.

A binary request is the JSON header followed by raw tensors; ``Inference-Header-Content-Length``
says where the header ends, and each binary input names its ``binary_data_size``. An output is
answered in binary when it asks for ``binary_data`` or the request sets ``binary_data_output``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from modelpack.codec import encode_tensor
from modelpack.errors import InputError, clip
from modelpack.manifest import TensorSpec
from modelpack.serving.limits import ServingLimits
from modelpack.serving.numbers import from_numbers
from modelpack.serving.tensors import (
    NUMERIC_DTYPES,
    check_declared_shape,
    check_names,
    from_bytes,
    shown,
)

HEADER_LENGTH = "inference-header-content-length"

DATATYPES = {
    "BOOL": "bool",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
OIP_NAME = {v: k for k, v in DATATYPES.items()}
# By numpy dtype, for each answer's outputs (str() of a dtype is a slow property).
_OIP_BY_DTYPE = {np.dtype(name): oip_name for name, oip_name in OIP_NAME.items()}


MAX_ID_CHARS = 128  # the cap of an MQTT request's id: one id, the same cap on every target
UINT64_MAX = 2**64 - 1  # Triton's timeout (microseconds) and priority are uint64


@dataclass(frozen=True)
class OipRequest:
    inputs: dict[str, np.ndarray]
    outputs: dict[str, bool] | None  # requested output -> binary; None: all of them
    binary_default: bool
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    timeout_s: float | None = None  # Triton's ``timeout`` parameter (microseconds), checked


def client_timeout_s(value: Any, name: str, per_second: int) -> float | None:
    """A client's timeout (OIP ``timeout`` in microseconds, MQTT ``timeout_ms``) in seconds;
    None for none or 0. Anything but a number from 0 to 2**64-1 is a 400, checked before any
    conversion: float() of 1 followed by 400 zeros raises OverflowError (it was a 500)."""
    if value is None:
        return None
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not 0 <= value <= UINT64_MAX
    ):
        raise InputError(
            f"parameter {name} must be a number from 0 to {UINT64_MAX}, got {_brief(value)}",
            reason="invalid",
        )
    return float(value) / per_second if value > 0 else None


def _brief(value: Any) -> str:
    if isinstance(value, int) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    return clip(repr(value), 40)


def _request_id(value: Any) -> str | None:
    """An id is echoed in the answer, in logs and over MQTT: bounded, and text every writer can
    encode (a lone surrogate cannot be UTF-8) without control characters."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InputError("id must be a string", reason="invalid")
    if len(value) > MAX_ID_CHARS:
        raise InputError(
            f"id is {len(value)} characters; the cap is {MAX_ID_CHARS}", reason="invalid"
        )
    if any(c < " " or c == "\x7f" or "\ud800" <= c <= "\udfff" for c in value):
        raise InputError(
            "id must be text without control characters or lone surrogates", reason="invalid"
        )
    return value


def _priority(params: Mapping[str, Any]) -> None:
    """Triton's ``priority`` (uint64; all requests are served alike here): checked, not used."""
    value = params.get("priority")
    if value is not None and (
        not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= UINT64_MAX
    ):
        raise InputError(
            f"parameter priority must be an integer from 0 to {UINT64_MAX}, got {_brief(value)}",
            reason="invalid",
        )


def datatype(dtype: str) -> str:
    return OIP_NAME.get(dtype, "BYTES")


def split_body(
    body: bytes | bytearray, header_length: str | None
) -> tuple[bytes | bytearray, memoryview | None]:
    """The JSON header and the binary section of a request (None without the extension)."""
    if header_length is None:
        return body, None
    # ASCII digits, and no longer than the body's own length could be: int() of a 5000-digit
    # header raises, and non-ASCII digits (which str.isdigit accepts) are not HTTP.
    text = header_length.strip()
    if (
        not (text.isascii() and text.isdigit())
        or len(text) > len(str(len(body)))
        or int(text) > len(body)
    ):
        raise InputError(
            f"Inference-Header-Content-Length {header_length!r} is not a length within the body",
            reason="invalid",
        )
    cut = int(text)
    return body[:cut], memoryview(body)[cut:]


def _params(doc: Mapping[str, Any], where: str) -> dict[str, Any]:
    params = doc.get("parameters", {})
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise InputError(f"{where}: parameters must be an object", reason="invalid")
    return dict(params)


def _tensor(
    doc: Any,
    specs: Mapping[str, TensorSpec],
    binary: memoryview | None,
    offset: int,
    limits: ServingLimits,
) -> tuple[str, np.ndarray, int]:
    if not isinstance(doc, Mapping) or not isinstance(doc.get("name"), str):
        raise InputError("each input is an object with a name", reason="invalid")
    name = doc["name"]
    spec = specs.get(name)
    if spec is None:
        raise InputError(
            f"unknown input {shown(name)}; the model takes {', '.join(specs)}",
            reason="unknown_input",
        )
    oip_type = doc.get("datatype")
    dtype = DATATYPES.get(oip_type) if isinstance(oip_type, str) else None
    if dtype is None or dtype not in NUMERIC_DTYPES:
        raise InputError(
            f"input {name!r}: datatype {_brief(oip_type)} is not one of {', '.join(DATATYPES)}",
            reason="dtype",
        )
    if dtype != spec.dtype:
        raise InputError(
            f"input {name!r}: the model takes {datatype(spec.dtype)}, got {oip_type}",
            reason="dtype",
        )
    dims, count = check_declared_shape(spec, doc.get("shape"), limits)
    size = _params(doc, f"input {name!r}").get("binary_data_size")
    if size is not None:
        if binary is None or not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InputError(
                f"input {name!r}: binary_data_size needs the binary extension and a size",
                reason="invalid",
            )
        if offset + size > len(binary):
            raise InputError(
                f"input {name!r}: binary_data_size {size} runs past the end of the body",
                reason="invalid",
            )
        array = from_bytes(spec, dtype, list(dims), binary[offset : offset + size], limits)
        return name, array, offset + size
    if "data" not in doc:
        raise InputError(f"input {name!r}: no data and no binary_data_size", reason="invalid")
    array = from_numbers(spec, doc["data"])
    if array.size != count:
        raise InputError(
            f"input {name!r}: {array.size} values do not fill shape {list(dims)}", reason="shape"
        )
    return name, array.reshape(dims), offset


def _flag(params: Mapping[str, Any], name: str) -> bool | None:
    """A boolean parameter: ``"false"`` is not false, so anything but a JSON bool is refused."""
    value = params.get(name)
    if value is not None and not isinstance(value, bool):
        raise InputError(
            f"parameter {name} must be true or false, got {_brief(value)}", reason="invalid"
        )
    return value


def _requested(doc: Any, names: Sequence[str]) -> dict[str, bool] | None:
    if doc is None:
        return None
    if not isinstance(doc, list):
        raise InputError("outputs must be a list", reason="invalid")
    wanted: dict[str, bool] = {}
    for item in doc:
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
            raise InputError("each requested output is an object with a name", reason="invalid")
        if item["name"] not in names:
            raise InputError(
                f"unknown output {shown(item['name'])}; the model gives {', '.join(names)}",
                reason="unknown_output",
            )
        if item["name"] in wanted:
            raise InputError(f"output {item['name']!r} is asked for twice", reason="invalid")
        params = _params(item, f"output {item['name']!r}")
        if params.get("classification"):  # Triton's class_count: top-k labels, as BYTES
            raise InputError(
                f"output {item['name']!r}: the classification extension is not served; "
                "ask for the tensor itself",
                reason="invalid",
            )
        flag = _flag(params, "binary_data")
        wanted[item["name"]] = flag  # type: ignore[assignment]
    return wanted


def decode(
    doc: Any,
    binary: memoryview | None,
    specs: Mapping[str, TensorSpec],
    outputs: Sequence[str],
    limits: ServingLimits,
) -> OipRequest:
    if not isinstance(doc, Mapping) or not isinstance(doc.get("inputs"), list):
        raise InputError(
            'an inference request is {"inputs": [{"name", "shape", "datatype", "data"}]}',
            reason="invalid",
        )
    request_id = _request_id(doc.get("id"))
    params = _params(doc, "the request")
    timeout_s = client_timeout_s(params.get("timeout"), "timeout", 1_000_000)
    _priority(params)
    names = [t.get("name") if isinstance(t, Mapping) else None for t in doc["inputs"]]
    if all(isinstance(n, str) for n in names):
        check_names(specs, names)  # type: ignore[arg-type]
    feed: dict[str, np.ndarray] = {}
    offset = 0
    for tensor in doc["inputs"]:
        name, array, offset = _tensor(tensor, specs, binary, offset, limits)
        feed[name] = array
    if binary is not None and offset != len(binary):
        raise InputError(
            f"the binary section is {len(binary)} bytes but the inputs use {offset}",
            reason="invalid",
        )
    default = bool(_flag(params, "binary_data_output"))
    requested = _requested(doc.get("outputs"), outputs)
    if requested is not None:
        requested = {k: default if v is None else v for k, v in requested.items()}
    return OipRequest(feed, requested, default, request_id, params, timeout_s)


def answer_doc(
    request: OipRequest,
    outputs: Mapping[str, np.ndarray],
    model_name: str,
    version: str,
    json_only: bool = False,
    body: bool = False,
) -> tuple[dict[str, Any], list[bytes]]:
    """The answer's JSON document and the raw bytes of its binary outputs, in order. ``body``:
    the document goes straight to ``dumps`` (see ``codec.numbers``)."""
    wanted = request.outputs or dict.fromkeys(outputs, request.binary_default)
    tensors, blobs = [], []
    for name, binary in wanted.items():
        # np.require, not np.ascontiguousarray: that one makes a 0-d output 1-d, shape [1].
        array = np.require(outputs[name], requirements="C")
        tensor: dict[str, Any] = {
            "name": name,
            "datatype": _OIP_BY_DTYPE.get(array.dtype) or datatype(str(array.dtype)),
            "shape": list(array.shape),
        }
        if binary and not json_only:
            raw = array.tobytes()
            tensor["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            tensor["data"] = encode_tensor(array.reshape(-1), body=body)
        tensors.append(tensor)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": version, "outputs": tensors}
    if request.id is not None:
        doc["id"] = request.id
    return doc, blobs


def model_metadata(
    name: str, version: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]
) -> dict[str, Any]:
    def tensor(spec: TensorSpec) -> dict[str, Any]:
        shape = [d if isinstance(d, int) else -1 for d in (spec.shape or [])]
        return {"name": spec.name, "datatype": datatype(spec.dtype), "shape": shape}

    return {
        "name": name,
        "versions": [version],
        "platform": "onnxruntime_onnx",
        "inputs": [tensor(s) for s in inputs],
        "outputs": [tensor(s) for s in outputs],
    }
