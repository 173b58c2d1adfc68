"""Monitored features: what a model's inputs and outputs are reduced to for drift, and binning.

A *reducer* turns one tensor of a request (rows first) into a few numbers per row, the
*features* whose distribution a device summarises against the pack's baseline:

* ``columns``: each column of a tabular input (``x[0]``, ``x[1]``, ...), at most 64;
* ``summary``: each row's mean and standard deviation (wide or deep tensors);
* ``image``: per-channel mean and standard deviation and the brightness (NCHW or NHWC);
* ``tokens``: the sequence length (tokens that are not padding) and the unknown-token share;
* ``classes``: the predicted class (argmax, a categorical feature) and its confidence;
* ``none``: not monitored.

A spec is written ``TENSOR=REDUCER[:key=value,...]`` (``--monitor`` on ``edgebento optimize``
and ``edgebento pack create``), e.g. ``input_ids=tokens:unk=100,pad=0`` or
``pixels=image:channels=last``; the specs travel in ``baseline.json``, signed with the pack.

Pure numpy and stdlib: the edge agent imports this module on every device.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from modelpack.errors import ConfigError

REDUCERS = ("columns", "summary", "image", "tokens", "classes", "none")
MAX_COLUMNS = 64  # features one ``columns`` tensor gives; wider tensors get ``summary``
MAX_FEATURES = 64  # per pack: bounds the bytes of a summary (docs/monitoring.md)
MAX_CLASSES = 1000
_SPEC = re.compile(r"^(?P<tensor>[^=\s]{1,128})=(?P<reducer>[a-z]+)(?::(?P<params>.*))?$")
_PARAMS = {
    "columns": (),
    "summary": (),
    "image": ("channels",),
    "tokens": ("unk", "pad"),
    "classes": ("scores",),
    "none": (),
}


@dataclass(frozen=True)
class MonitorSpec:
    """Which reducer watches one tensor (an input or an output), with its parameters."""

    tensor: str
    reducer: str
    params: tuple[tuple[str, str], ...] = ()
    output: bool = False

    def param(self, key: str, default: str) -> str:
        return dict(self.params).get(key, default)

    @property
    def text(self) -> str:
        tail = ",".join(f"{k}={v}" for k, v in self.params)
        return f"{self.tensor}={self.reducer}" + (f":{tail}" if tail else "")


def parse_monitor(text: str) -> MonitorSpec:
    """``TENSOR=REDUCER[:key=value,...]``; a ConfigError says what is wrong."""
    match = _SPEC.match(text.strip())
    if match is None or match["reducer"] not in REDUCERS:
        raise ConfigError(
            f"--monitor {text[:80]!r}: write TENSOR=REDUCER[:key=value,...] with a reducer "
            f"among {', '.join(REDUCERS)}"
        )
    reducer, params = match["reducer"], []
    for item in filter(None, (match["params"] or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in _PARAMS[reducer]:
            allowed = ", ".join(_PARAMS[reducer]) or "none"
            raise ConfigError(f"--monitor {text[:80]!r}: {reducer} takes parameters {allowed}")
        params.append((key, value))
    spec = MonitorSpec(match["tensor"], reducer, tuple(params))
    _check_params(spec)
    return spec


def _check_params(spec: MonitorSpec) -> None:
    if spec.reducer == "tokens":
        for key in ("unk", "pad"):
            if not re.fullmatch(r"-?\d{1,12}", spec.param(key, "0")):
                raise ConfigError(f"--monitor {spec.text}: {key} must be a token id")
    if spec.reducer == "classes" and spec.param("scores", "probs") not in ("probs", "logits"):
        raise ConfigError(f"--monitor {spec.text}: scores is probs or logits")
    if spec.reducer == "image" and spec.param("channels", "first") not in ("first", "last"):
        raise ConfigError(f"--monitor {spec.text}: channels is first or last")


@dataclass(frozen=True)
class TensorInfo:
    """What choosing a default reducer needs to know of a tensor."""

    name: str
    dtype: str
    shape: Sequence[int | str | None] | None
    output: bool = False
    mask: bool = False  # an attention mask or token type ids: not monitored by default
    pad: float = 0


def default_spec(tensor: TensorInfo, sample: np.ndarray | None, labels: int = 0) -> MonitorSpec:
    """The reducer a tensor gets when no ``--monitor`` names it."""
    rank = sample.ndim if sample is not None else len(tensor.shape or ())
    width = int(np.prod(sample.shape[1:])) if sample is not None and sample.ndim > 1 else 1
    integer = tensor.dtype.startswith(("int", "uint"))
    name, output = tensor.name, tensor.output
    if tensor.mask:
        return MonitorSpec(name, "none", output=output)
    if output:
        probs = sample is not None and probabilities(sample)
        if rank == 2 and 2 <= width <= MAX_CLASSES and (labels == width or probs):
            return MonitorSpec(name, "classes", output=True)
        if integer and rank == 1:
            return MonitorSpec(name, "classes", output=True)
    elif integer and rank == 2:
        return MonitorSpec(name, "tokens", (("pad", str(int(tensor.pad))),))
    if not output and rank == 4:
        return MonitorSpec(name, "image")
    if rank <= 2 and width <= (16 if output else MAX_COLUMNS):
        return MonitorSpec(name, "columns", output=output)
    return MonitorSpec(name, "summary", output=output)


def probabilities(sample: np.ndarray) -> bool:
    if sample.ndim != 2 or not sample.size or not np.issubdtype(sample.dtype, np.floating):
        return False
    finite = sample[np.isfinite(sample).all(axis=1)]
    if not len(finite):
        return False
    # An 8-bit quantized softmax (steps of 1/255) is off by up to half a step per class.
    atol = min(0.05, max(1e-3, sample.shape[1] / 510))
    return bool((finite >= 0).all() and np.allclose(finite.sum(axis=1), 1.0, atol=atol))


def _rows(array: np.ndarray) -> np.ndarray:
    """Rows first, one row per request row, as float64."""
    values = np.asarray(array)
    if values.ndim == 0:
        values = values.reshape(1)
    return values.reshape(values.shape[0], -1).astype(np.float64, copy=False)


def feature_names(spec: MonitorSpec, sample: np.ndarray) -> list[str]:
    """The names of the features ``reduce`` gives for a tensor shaped like ``sample``."""
    t = spec.tensor
    if spec.reducer == "none":
        return []
    if spec.reducer == "columns":
        width = _rows(sample).shape[1]
        if width > MAX_COLUMNS:
            raise ConfigError(f"{t} has {width} columns; monitor it with {t}=summary")
        return [t] if np.asarray(sample).ndim <= 1 else [f"{t}[{i}]" for i in range(width)]
    if spec.reducer == "summary":
        return [f"{t}.mean", f"{t}.std"]
    if spec.reducer == "image":
        channels = _channels(spec, np.asarray(sample)).shape[1]
        per = [f"{t}.c{c}.{stat}" for c in range(channels) for stat in ("mean", "std")]
        return [*per, f"{t}.brightness"]
    if spec.reducer == "tokens":
        return [f"{t}.length", f"{t}.unknown_share"]
    # classes: a label index (rank 1) has no confidence to report
    return [f"{t}.class"] if np.asarray(sample).ndim == 1 else [f"{t}.class", f"{t}.confidence"]


def _channels(spec: MonitorSpec, array: np.ndarray) -> np.ndarray:
    """(rows, channels, pixels) from NCHW or NHWC, as float32 (``image_stats``)."""
    if array.ndim != 4:
        raise ConfigError(f"{spec.tensor}: the image reducer takes rank-4 tensors")
    last = spec.param("channels", "first" if array.shape[1] in (1, 3, 4) else "last") == "last"
    if last:
        array = np.moveaxis(array, -1, 1)
    return array.reshape(array.shape[0], array.shape[1], -1).astype(np.float32, copy=False)


_LUMA = np.asarray((0.299, 0.587, 0.114), dtype=np.float32)  # ITU-R BT.601


def image_stats(pixels: np.ndarray, owned: bool = False) -> np.ndarray:
    """The image reducer's features of (rows, channels, pixels) float32 images, as a
    (features, rows) float64 matrix: per channel its mean and standard deviation, then the
    brightness. The one implementation both sides use: the baseline (``reduce``, at
    ``optimize`` and ``pack create``) and the device (``edge_agent.drift_bins``), so their
    floats are the same. In float32: a third less of the device's time per image than float64,
    and every feature a float32 value, which the bins compare in float32 (``drift_bins.Bins``);
    pairwise summation keeps the mean of a million pixels to 1e-7 relative, far inside a bin.
    ``owned``: the caller gives ``pixels`` up, and the deviations are squared in its memory
    rather than in a temporary of its size."""
    rows, channels, count = pixels.shape
    # einsum's sums run in SIMD lanes: a fifth of ``add.reduce``'s time over an image's
    # contiguous pixels, to 1e-7 relative all the same.
    means = np.einsum("ijk->ij", pixels) / np.float32(count)
    deviations = np.subtract(pixels, means[..., None], out=pixels if owned else None)
    np.square(deviations, out=deviations)
    variance = np.einsum("ijk->ij", deviations) / np.float32(count)
    std = np.sqrt(variance, out=variance)
    out = np.empty((2 * channels + 1, rows))
    out[0:-1:2], out[1:-1:2] = means.T, std.T
    if channels == 3:  # products summed in a fixed order: a matmul's order moves with the rows
        out[-1] = means[:, 0] * _LUMA[0] + means[:, 1] * _LUMA[1] + means[:, 2] * _LUMA[2]
    else:
        out[-1] = means.mean(axis=1, dtype=np.float32)
    return out


def reduce(spec: MonitorSpec, array: np.ndarray) -> np.ndarray:
    """The features of one tensor: a (rows, features) float64 matrix, in ``feature_names``'
    order. NaN stays NaN (counted apart); a class index is a float holding an integer."""
    array = np.asarray(array)
    if spec.reducer == "columns":
        return _rows(array)
    if spec.reducer == "summary":
        rows = _rows(array)
        return np.stack([rows.mean(axis=1), rows.std(axis=1)], axis=1)
    if spec.reducer == "image":
        pixels = _channels(spec, array)
        return image_stats(pixels, owned=not np.may_share_memory(pixels, array)).T
    if spec.reducer == "tokens":
        ids = np.asarray(array).reshape(len(array), -1)
        pad, unk = int(spec.param("pad", "0")), int(spec.param("unk", "100"))
        length = (ids != pad).sum(axis=1).astype(np.float64)
        unknown = (ids == unk).sum(axis=1) / np.maximum(length, 1.0)
        return np.stack([length, unknown], axis=1)
    if spec.reducer == "classes":
        if array.ndim == 1:
            return array.astype(np.float64).reshape(-1, 1)
        scores = _rows(array)
        top = np.argmax(scores, axis=1).astype(np.float64)
        top[np.isnan(scores).any(axis=1)] = np.nan
        return np.stack([top, _confidence(scores, spec.param("scores", ""))], axis=1)
    return np.empty((len(array) if array.ndim else 1, 0))


def _confidence(scores: np.ndarray, kind: str = "") -> np.ndarray:
    """The top class's probability: the scores as they are when they are probabilities, else
    their softmax (logits). The baseline decides which once (``scores``), so a device does not
    test every batch."""
    if kind == "probs" or (not kind and probabilities(scores)):
        return np.asarray(scores.max(axis=1), dtype=np.float64)
    shifted = scores - scores.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return np.asarray(1.0 / exp.sum(axis=1), dtype=np.float64)  # exp(0) over the sum


@dataclass
class Binner:
    """Counts many features at once in their baseline's bins, vectorised over features.

    Feature ``f`` has edges ``e_0 < ... < e_m``: bin 0 holds values below ``e_0`` and bin
    ``m + 1`` values at or above ``e_m`` (both out of the baseline's range), bin ``j`` values
    in ``[e_{j-1}, e_j)``. NaN is counted apart, never in a bin.
    """

    edges: Sequence[Sequence[float]]
    _padded: np.ndarray = field(init=False, repr=False)
    _offsets: np.ndarray = field(init=False, repr=False)
    _own: list[np.ndarray] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        widest = max((len(e) for e in self.edges), default=1)
        # Padding with +inf puts nothing past a feature's own last bin.
        padded = np.full((len(self.edges), widest), np.inf)
        for i, e in enumerate(self.edges):
            padded[i, : len(e)] = e
        self._padded = padded
        self._own = [np.asarray(e, dtype=np.float64) for e in self.edges]
        self._offsets = np.arange(len(self.edges)) * (widest + 1)

    @property
    def width(self) -> int:
        return int(self._padded.shape[1]) + 1

    def count(self, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(counts per feature and bin, NaN per feature) of a (rows, features) matrix."""
        columns = np.ascontiguousarray(matrix.T)  # a feature's values side by side
        nan = np.isnan(columns)
        index = np.empty(columns.shape, dtype=np.intp)
        for f, edges in enumerate(self._own):  # a binary search per feature, in C
            index[f] = edges.searchsorted(columns[f], side="right")
        index += self._offsets[:, None]
        flat = index[~nan] if nan.any() else index.reshape(-1)
        counts = np.bincount(flat, minlength=len(self.edges) * self.width)
        return counts.reshape(len(self.edges), self.width), nan.sum(axis=1)

    def trim(self, counts: np.ndarray) -> list[list[int]]:
        """Each feature's own bins (the padding's always-empty bins left out)."""
        return [[int(c) for c in counts[i, : len(e) + 1]] for i, e in enumerate(self.edges)]


def reduce_all(
    specs: Sequence[MonitorSpec], tensors: Mapping[str, np.ndarray], rows: int
) -> np.ndarray:
    """Every monitored feature of one request side by side: (rows, features), in spec order.
    A tensor whose rows differ from the request's (a scalar output) is left out as NaN."""
    parts = []
    for spec in specs:
        if spec.reducer == "none":
            continue
        reduced = reduce(spec, tensors[spec.tensor])
        if len(reduced) != rows:
            reduced = np.full((rows, reduced.shape[1]), np.nan)
        parts.append(reduced)
    return np.concatenate(parts, axis=1) if parts else np.empty((rows, 0))


Request = tuple[Mapping[str, np.ndarray], int]  # one request's tensors and its rows


def reduce_batch(specs: Sequence[MonitorSpec], requests: Sequence[Request]) -> np.ndarray:
    """``reduce_all`` of many requests at once: requests whose tensors have the same shapes
    past the rows are concatenated and reduced together (a few numpy calls for hundreds of
    requests, not a few per request). Rows come out grouped by shape, which counting ignores."""
    watched = [s for s in specs if s.reducer != "none"]
    groups: dict[tuple[Any, ...], list[Request]] = {}
    names = [s.tensor for s in watched]
    for i, (tensors, rows) in enumerate(requests):
        key: list[Any] = []
        for name in names:
            shape = np.shape(tensors[name])
            # A tensor without a row per request row (a scalar output) is reduced on its own.
            key.append(shape[1:] if shape and shape[0] == rows else ("apart", i))
        groups.setdefault(tuple(key), []).append((tensors, rows))
    parts = []
    for members in groups.values():
        if len(members) == 1:
            parts.append(reduce_all(specs, members[0][0], members[0][1]))
            continue
        joined = {s.tensor: np.concatenate([m[0][s.tensor] for m in members]) for s in watched}
        parts.append(reduce_all(specs, joined, sum(m[1] for m in members)))
    width = sum(1 for _ in watched)
    return np.concatenate(parts) if parts else np.empty((0, width))
