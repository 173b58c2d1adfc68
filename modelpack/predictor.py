"""The one ONNX Runtime predictor every target uses: validate, run, name the outputs."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelpack.codec import decode_request, encode_response
from modelpack.errors import InferenceError, InputError, ModelInvalidError
from modelpack.manifest import TensorSpec
from modelpack.pack import Pack

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictorOptions:
    intra_op_threads: int = 0  # 0: ONNX Runtime's default (one per physical core)
    # Spinning threads burn the cores they wait on; two spinning sessions in one process
    # slowed each other by up to 2x here, so it is off unless a session owns the machine.
    spinning: bool = False
    warmup: bool = True
    max_batch: int = 4096
    max_input_bytes: int = 256 << 20
    graph_optimization: str = "all"  # all | extended | basic | disabled


_LEVELS = {
    "all": "ORT_ENABLE_ALL",
    "extended": "ORT_ENABLE_EXTENDED",
    "basic": "ORT_ENABLE_BASIC",
    "disabled": "ORT_DISABLE_ALL",
}


def session_options(options: PredictorOptions) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = options.intra_op_threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = getattr(
        ort.GraphOptimizationLevel, _LEVELS[options.graph_optimization]
    )
    so.log_severity_level = 3
    spin = "1" if options.spinning else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    so.add_session_config_entry("session.inter_op.allow_spinning", spin)
    return so


def _coerce(name: str, array: np.ndarray, dtype: str) -> np.ndarray:
    """Safe coercion from what JSON can carry to the model's dtype; refuse anything lossy."""
    target = np.dtype(dtype)
    if array.dtype == target:
        return array
    kind = array.dtype.kind
    if target.kind == "f" and kind in "biuf":
        return array.astype(target)
    if target.kind in "iu" and kind in "biuf":
        if kind == "f" and not np.all(np.isfinite(array) & (array == np.round(array))):
            raise InputError(
                f"input {name!r}: expected integers ({dtype}), got fractions", reason="dtype"
            )
        info = np.iinfo(target)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise InputError(f"input {name!r}: values out of range for {dtype}", reason="dtype")
        return array.astype(target)
    if target.kind == "b" and kind in "biu" and np.isin(array, (0, 1)).all():
        return array.astype(bool)
    raise InputError(f"input {name!r}: expected {dtype}, got {array.dtype}", reason="dtype")


def _check_shape(spec: TensorSpec, array: np.ndarray, symbols: dict[str, int]) -> None:
    if spec.shape is None:
        return
    if array.ndim != len(spec.shape):
        raise InputError(
            f"input {spec.name!r}: expected rank {len(spec.shape)} {_fmt(spec.shape)}, got shape {list(array.shape)}",
            reason="shape",
        )
    for axis, (want, got) in enumerate(zip(spec.shape, array.shape, strict=True)):
        if isinstance(want, int) and want != got:
            raise InputError(
                f"input {spec.name!r}: dim {axis} must be {want} {_fmt(spec.shape)}, got {got}",
                reason="shape",
            )
        if isinstance(want, str):
            seen = symbols.setdefault(want, got)
            if seen != got:
                raise InputError(
                    f"input {spec.name!r}: dim {axis} ({want}) is {got} but {seen} in another input",
                    reason="shape",
                )


def _fmt(shape: Sequence[Any]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


class Predictor:
    """An ONNX Runtime session behind input validation, with named outputs."""

    def __init__(
        self,
        model: Path | bytes,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        options: PredictorOptions | None = None,
        model_ref: Mapping[str, Any] | None = None,
    ) -> None:
        import onnxruntime as ort

        self.options = options or PredictorOptions()
        self.inputs = {s.name: s for s in inputs}
        self.outputs = [s.name for s in outputs]
        self.model_ref = dict(model_ref or {})
        source = str(model) if isinstance(model, Path) else model
        try:
            self.session = ort.InferenceSession(
                source, session_options(self.options), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise ModelInvalidError(f"ONNX Runtime cannot load the model: {exc}") from exc
        self.warmup_error: str | None = None
        if self.options.warmup:
            self.warmup()

    @classmethod
    def from_pack(cls, pack: Pack, options: PredictorOptions | None = None) -> Predictor:
        m = pack.manifest
        return cls(pack.model_path, m.inputs, m.outputs, options, model_ref=m.model_ref)

    @property
    def batch_dynamic(self) -> bool:
        return bool(self.inputs) and all(s.batch_dynamic for s in self.inputs.values())

    def warmup(self) -> None:
        """One run on zeros (symbolic dims set to 1) so the first request pays no set-up."""
        feed = {}
        for spec in self.inputs.values():
            shape = [d if isinstance(d, int) else 1 for d in (spec.shape or [])]
            feed[spec.name] = np.zeros(shape, dtype=spec.dtype)
        try:
            self.session.run(None, feed)
        except Exception as exc:  # some models need real data; that is not an error here
            self.warmup_error = str(exc).splitlines()[0]
            log.debug("warmup run failed: %s", self.warmup_error)

    def validate(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        unknown = sorted(set(inputs) - set(self.inputs))
        if unknown:
            raise InputError(
                f"unknown input {unknown[0]!r}; the model takes {', '.join(self.inputs)}",
                reason="unknown_input",
            )
        missing = [n for n in self.inputs if n not in inputs]
        if missing:
            raise InputError(f"missing input {missing[0]!r}", reason="missing_input")
        feed: dict[str, np.ndarray] = {}
        symbols: dict[str, int] = {}
        total = 0
        for name, spec in self.inputs.items():
            value = inputs[name]
            array = value if isinstance(value, np.ndarray) else np.asarray(value)
            array = _coerce(name, array, spec.dtype)
            _check_shape(spec, array, symbols)
            if spec.batch_dynamic and array.ndim and array.shape[0] > self.options.max_batch:
                raise InputError(
                    f"input {name!r}: batch of {array.shape[0]} is over the cap of {self.options.max_batch}",
                    reason="batch_too_large",
                )
            total += array.nbytes
            feed[name] = array
        if total > self.options.max_input_bytes:
            raise InputError(
                f"inputs are {total} bytes; the cap is {self.options.max_input_bytes}",
                reason="too_large",
            )
        return feed

    def run(self, inputs: Mapping[str, Any], validate: bool = True) -> dict[str, np.ndarray]:
        from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

        feed = self.validate(inputs) if validate else dict(inputs)
        try:
            values = self.session.run(self.outputs, feed)
        except InvalidArgument as exc:
            raise InputError(
                f"the model refused the input: {str(exc).splitlines()[0]}", reason="invalid"
            ) from exc
        except Exception as exc:
            raise InferenceError(f"inference failed: {str(exc).splitlines()[0]}") from exc
        return dict(zip(self.outputs, values, strict=True))

    def predict(self, payload: Any, binary: bool = False) -> dict[str, Any]:
        """Tensor JSON in, tensor JSON out: the contract of every target."""
        start = time.perf_counter()
        outputs = self.run(decode_request(payload))
        return encode_response(
            outputs, self.model_ref, (time.perf_counter() - start) * 1000, binary
        )
