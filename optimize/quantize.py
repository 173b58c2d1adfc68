"""int8 quantization candidates: dynamic variants and static QDQ with calibration.

Each candidate is a ``QuantizeConfig``; ``quantize`` is its pure transform. ``search_space``
lists the candidates worth measuring for a model: on an AVX2 CPU without VNNI, U8S8 products can
saturate (``reduce_range`` trades one bit for safety), per-channel weights keep accuracy, and
quantizing only MatMul/Gemm (not Gather, not the attention helpers) often keeps fidelity at
nearly the same speed. Which is best is measured, never assumed.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from optimize.data import Dataset
from optimize.passes import PassConfig

log = logging.getLogger(__name__)

Calibration = Literal["MinMax", "Entropy", "Percentile"]


class QuantizeConfig(PassConfig):
    mode: Literal["dynamic", "static"]
    per_channel: bool = False
    reduce_range: bool = False
    weight_type: Literal["int8", "uint8"] = "int8"
    op_types: tuple[str, ...] = ()  # () = every op type the quantizer supports
    calibration: Calibration = "MinMax"
    exclude: tuple[str, ...] = ()  # node names kept in float
    calibration_rows: int = 64

    @property
    def label(self) -> str:
        parts: list[str] = [self.mode]
        if self.mode == "static":
            parts.append(self.calibration.lower())
        if self.per_channel:
            parts.append("per-channel")
        if self.reduce_range:
            parts.append("reduce-range")
        if self.weight_type != "int8":
            parts.append(self.weight_type)
        if self.op_types:
            parts.append("+".join(self.op_types))
        if self.exclude:
            parts.append(f"exclude-{len(self.exclude)}")
        return " ".join(parts)


class PreprocessConfig(PassConfig):
    """ORT's quant_pre_process: symbolic shape inference, graph optimization, shape inference."""

    skip_symbolic_shape: bool = False
    skip_optimization: bool = False


def preprocess(src: Path, dst: Path, config: PreprocessConfig) -> None:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = src.resolve(), dst.resolve()
    # When symbolic shape inference gives up, ORT saves its partial model (and the weights
    # beside it) into the working directory: keep that litter in a directory of our own.
    with tempfile.TemporaryDirectory(prefix="edgebento-prep-") as tmp, contextlib.chdir(tmp):
        quant_pre_process(
            str(src),
            str(dst),
            skip_symbolic_shape=config.skip_symbolic_shape,
            skip_optimization=config.skip_optimization,
        )


PREPROCESS_FALLBACKS = (
    PreprocessConfig(),
    # ORT's symbolic shape inference fails on some real models (unknown ops, loops).
    PreprocessConfig(skip_symbolic_shape=True),
    PreprocessConfig(skip_symbolic_shape=True, skip_optimization=True),
)


class CalibrationReader:
    """Feeds calibration rows to ORT's static quantizer, one small batch at a time."""

    def __init__(self, data: Dataset, rows: int, batch: int = 8) -> None:
        # Equal batches only: the histogram calibrators stack every batch's activations into
        # one array, and a short last batch makes it ragged ("inhomogeneous shape").
        usable = min(rows, data.rows)
        size = min(batch, usable)
        usable -= usable % size
        self._batches = list(data.take(slice(0, usable)).batches(size))
        self._iter: Iterator[dict[str, np.ndarray]] = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self._batches)


def _qtype(name: str) -> object:
    from onnxruntime.quantization import QuantType

    return QuantType.QInt8 if name == "int8" else QuantType.QUInt8


def quantize_with(data: Dataset | None) -> object:
    """The transform for ``Runner.run``; static configs calibrate on ``data``."""

    def quantize(src: Path, dst: Path, config: QuantizeConfig) -> None:
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_dynamic,
            quantize_static,
        )

        # Graphs already fused by ORT carry ops without type info; default them to float.
        extra = {"DefaultTensorType": 1}
        op_types = list(config.op_types) or None
        if config.mode == "dynamic":
            quantize_dynamic(
                str(src),
                str(dst),
                per_channel=config.per_channel,
                reduce_range=config.reduce_range,
                weight_type=_qtype(config.weight_type),
                op_types_to_quantize=op_types,
                nodes_to_exclude=list(config.exclude),
                extra_options=extra,
            )
            return
        if data is None:
            raise ValueError("static quantization needs calibration data")

        def run(method: str, options: dict[str, object]) -> None:
            quantize_static(
                str(src),
                str(dst),
                CalibrationReader(data, config.calibration_rows),
                quant_format=QuantFormat.QDQ,
                per_channel=config.per_channel,
                reduce_range=config.reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=_qtype(config.weight_type),
                op_types_to_quantize=op_types,
                nodes_to_exclude=list(config.exclude),
                calibrate_method=getattr(CalibrationMethod, method),
                extra_options={**extra, "CalibMovingAverage": False, **options},
            )

        try:
            run(config.calibration, {})
        except ValueError as exc:
            if config.calibration == "MinMax" or not _histogram_failure(exc):
                raise
            # ORT's histograms are float32: a near-constant activation has no room for 2048
            # bins. The same tails are cut in float64 here and given to ORT as fixed ranges.
            log.info(
                "%s calibration failed (%s): ranges computed in float64", config.calibration, exc
            )
            run("MinMax", {"TensorQuantOverrides": _overrides(src, data, config)})

    return quantize


def _histogram_failure(exc: Exception) -> bool:
    text = str(exc)
    return "bins" in text or "inhomogeneous" in text or "finite" in text


# What ORT's calibrators keep: Percentile cuts 0.001% of each tail; for Entropy, which picks the
# threshold that best keeps the distribution, 0.01% is the usual stand-in.
FALLBACK_PERCENTILE = {"Percentile": 99.999, "Entropy": 99.99}


def _overrides(src: Path, data: Dataset, config: QuantizeConfig) -> dict[str, list[dict[str, Any]]]:
    from optimize.sensitivity import activation_ranges

    ranges = activation_ranges(
        src, data, config.calibration_rows, FALLBACK_PERCENTILE[config.calibration]
    )
    found = {}
    for name, (lo, hi) in ranges.items():
        rmin, rmax = min(lo, 0.0), max(hi, 0.0)
        rmax = rmax if rmax > rmin else rmin + 1e-6
        found[name] = [{"rmin": np.float32(rmin), "rmax": np.float32(rmax)}]  # ORT wants dtypes
    return found


def search_space(mode: str, has_data: bool, op_types: set[str]) -> list[QuantizeConfig]:
    """The candidates to measure, most promising first.

    Static QDQ pays off where convolutions dominate, so it comes first there (per-channel
    weights, as convolutions need), with every calibrator. Elsewhere "auto" tries one static
    variant after the dynamic ones: its scales are fixed, so each row's answer is its own and
    the service can batch it, which dynamic int8 does not allow (calibrating a transformer
    costs minutes, so only one). Entropy calibration is tried beside MinMax and Percentile: it
    clips outliers that MinMax keeps.
    """
    if mode == "off":
        return []
    dynamic: list[QuantizeConfig] = []
    if mode in ("auto", "dynamic"):
        matmul_only = tuple(t for t in ("MatMul", "Gemm") if t in op_types)
        dynamic += [
            QuantizeConfig(mode="dynamic"),  # what quantize_dynamic gives by default
            QuantizeConfig(mode="dynamic", per_channel=True),
            QuantizeConfig(mode="dynamic", per_channel=True, reduce_range=True),
        ]
        if matmul_only:
            dynamic += [
                QuantizeConfig(mode="dynamic", per_channel=True, op_types=matmul_only),
                QuantizeConfig(
                    mode="dynamic", per_channel=True, reduce_range=True, op_types=matmul_only
                ),
            ]
    static: list[QuantizeConfig] = []
    if has_data and mode in ("auto", "static"):
        static += [
            QuantizeConfig(mode="static", per_channel=True, calibration="MinMax"),
            QuantizeConfig(
                mode="static", per_channel=True, reduce_range=True, calibration="MinMax"
            ),
            QuantizeConfig(mode="static", per_channel=True, calibration="Entropy"),
            QuantizeConfig(mode="static", per_channel=True, calibration="Percentile"),
        ]
        if mode == "auto" and "Conv" not in op_types:
            # Dynamic int8 scales a whole batch at once, so its rows mix and the service runs
            # it one request at a time; one static variant is the int8 whose rows stay apart.
            static = static[:1]
    return static + dynamic if "Conv" in op_types else dynamic + static
