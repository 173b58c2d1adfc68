"""The one ONNX Runtime predictor every target uses: validate, run, name the outputs."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelpack.errors import InferenceError, InputError, IntegrityError, ModelInvalidError
from modelpack.manifest import TensorSpec
from modelpack.pack import Pack
from modelpack.serving.limits import ServingLimits
from modelpack.serving.tensors import NUMERIC_DTYPES, check_feed, coerce

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictorOptions:
    intra_op_threads: int = 0  # 0: ONNX Runtime's default (one per physical core)
    # Spinning threads burn the cores they wait on; two spinning sessions in one process
    # slowed each other by up to 2x here, so it is off unless a session owns the machine.
    spinning: bool = False
    warmup: bool = True
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


class Predictor:
    """An ONNX Runtime session behind input validation, with named outputs."""

    def __init__(
        self,
        model: Path | bytes,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        options: PredictorOptions | None = None,
        model_ref: Mapping[str, Any] | None = None,
        external_data_dir: Path | None = None,
    ) -> None:
        import onnxruntime as ort

        self.options = options or PredictorOptions()
        strings = [s.name for s in (*inputs, *outputs) if s.dtype not in NUMERIC_DTYPES]
        if strings:
            raise ModelInvalidError(
                f"tensor {strings[0]!r} is a string tensor; edgebento serves numeric tensors only"
            )
        self.inputs = {s.name: s for s in inputs}
        self.outputs = [s.name for s in outputs]
        self.output_specs = list(outputs)  # what metadata reports: the io signature's dtypes
        self.model_ref = dict(model_ref or {})
        source = str(model) if isinstance(model, Path) else model
        so = session_options(self.options)
        if external_data_dir is not None:  # bytes whose external data lies beside them
            so.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", str(external_data_dir)
            )
        try:
            self.session = ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelInvalidError(f"ONNX Runtime cannot load the model: {exc}") from exc
        self.warmup_error: str | None = None
        if self.options.warmup:
            self.warmup()

    @classmethod
    def from_pack(cls, pack: Pack, options: PredictorOptions | None = None) -> Predictor:
        """The session is made from the bytes hashed here against the signed manifest, not
        from the path: a model rewritten on disk after the pack was verified is refused, never
        run (ONNX Runtime would otherwise open the file again, after the check)."""
        from modelpack.hashing import sha256_bytes
        from modelpack.manifest import MODEL_FILE

        m = pack.manifest
        data = pack.model_path.read_bytes()
        entry = m.file(MODEL_FILE)
        if entry is None or sha256_bytes(data) != entry.sha256:
            raise IntegrityError(
                f"{MODEL_FILE} changed on disk after the pack was verified; it is not loaded"
            )
        return cls(
            data, m.inputs, m.outputs, options, model_ref=m.model_ref, external_data_dir=pack.root
        )

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

    def validate(
        self, inputs: Mapping[str, Any], limits: ServingLimits | None = None
    ) -> dict[str, np.ndarray]:
        """Arrays of the model's dtypes, checked against the io signature (names, shapes,
        uniform rows across batch-major inputs, caps)."""
        limits = limits or ServingLimits()
        feed: dict[str, np.ndarray] = {}
        for name, value in inputs.items():
            spec = self.inputs.get(name)
            array = value if isinstance(value, np.ndarray) else np.asarray(value)
            feed[name] = array if spec is None else coerce(name, array, spec.dtype)
        check_feed(self.inputs, feed, limits)
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
