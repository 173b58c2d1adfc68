"""Counting on the device: answered requests' monitored tensors gathered between folds, reduced
to their features and counted in the baseline's bins, all vectorised (``edge_agent.drift``).

A request's small tensors (a tabular row, a class's scores) are copied on arrival into one
buffer per tensor (``Streams``): the request's arrays are freed with it, and a fold reads each
buffer as one array. Holding thousands of small arrays until a fold, then joining them, cost the
hot path more than the copy (the allocator cannot reuse their memory, and ``concatenate`` pays
per array); ``benchmarks/bench_drift.py`` measures both sides. Tensors too big to copy cheaply
(an image), or shaped unlike the buffers', are held by reference and joined at the fold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from modelpack.monitor import MonitorSpec

# A watched tensor whose rows hold at most this many bytes is copied on arrival; a bigger one
# (an image) would cost a copy of its pixels per request, so it is held by reference.
STREAM_ROW_BYTES = 4096
# Float32 bytes of images reduced at once (``held_columns``): the joined chunk, whose deviations
# are squared in place, stays in a core's 1 MB L2 cache; a fold's 4 MB of images reduced at
# once spilled to memory and cost twice as much per image.
_IMAGE_CHUNK_BYTES = 1 << 19
_DTYPE_SHAPE = attrgetter("dtype", "shape")
# Classes a probabilities output may have for ``_few_classes``: at 8, ``argmax`` was faster.
_FEW_CLASSES = 6
# Bytes of comparisons one pass of ``Bins.add`` may hold: about a core's cache, so a fold
# neither waits on memory nor evicts much of what the requests after it use.
_COMPARE_BYTES = 1 << 20
# A pass compares at least this many rows: numpy's comparison runs four times faster per value
# on rows of 3,000 values and more than on rows of 2,048 and less (numpy 2.4, AVX-512).
_MIN_PASS_BLOCKS = 4
# Rows summed as bytes inside one 64-bit word per pass (``Bins.add``): 128 words of 8 rows, so
# each byte counts at most 128 and never carries into its neighbour.
_BLOCK = 1024


@dataclass(slots=True)  # slots: the hot path reads its fields on every request
class _Stream:
    """One watched tensor's rows since the last fold, as bytes in one buffer."""

    tensor: str
    output: bool
    dtype: np.dtype[Any] | None = None
    tail: tuple[int, ...] = ()
    data: bytearray = field(default_factory=bytearray)

    def array(self) -> np.ndarray:
        assert self.dtype is not None
        return np.frombuffer(self.data, self.dtype).reshape(-1, *self.tail)


class Streams:
    """The watched tensors' buffers. A request fits when each of its watched tensors has the
    request's rows first and the dtype and trailing shape of the buffer's first request."""

    __slots__ = (
        "_fold_bytes",
        "_fold_rows",
        "fold_at",
        "hold_bytes",
        "hold_rows",
        "plan",
        "plan_rows",
        "row_bytes",
        "rows",
        "streams",
    )

    def __init__(self, specs: Sequence[MonitorSpec], fold_rows: int, fold_bytes: int) -> None:
        keys = dict.fromkeys((s.output, s.tensor) for s in specs if s.reducer != "none")
        self.streams = [_Stream(tensor, output) for output, tensor in keys]
        self.rows = 0
        self.row_bytes = 0
        self._fold_rows, self._fold_bytes = fold_rows, fold_bytes
        self.fold_at = fold_rows  # rows that call for a fold: ``fold_rows`` or ``fold_bytes``
        # The usual request's layout, decided once by ``take`` (the slow path) and read by the
        # hot path (``DriftMonitor.observe``) for requests of ``plan_rows`` rows: per watched
        # tensor, whether it is an output, its name, dtype and shape, and its buffer's ``extend``.
        self.plan: tuple[tuple[bool, str, np.dtype[Any], tuple[int, ...], Any], ...] = ()
        self.plan_rows = -1
        # The rows of the last request held by reference (``Window.add``: an image, or shaped
        # unlike the buffers), and its bytes: the hot path holds the next ones of those rows at
        # once, without trying the buffers first, until the next fold.
        self.hold_rows, self.hold_bytes = -1, 0

    def take(
        self, feed: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], rows: int
    ) -> bool:
        """Copies the request's watched tensors; False (nothing copied) when they do not fit.
        The slow path: the usual request goes through ``plan`` (``DriftMonitor.observe``)."""
        arrays = [(outputs if s.output else feed)[s.tensor] for s in self.streams]
        if not self._fits(arrays, rows):
            return False
        done = 0
        try:
            for stream, array in zip(self.streams, arrays, strict=True):
                stream.data.extend(array)
                done += 1
        except TypeError:  # not contiguous
            self.undo(done, feed, outputs)
            return False
        self.rows += rows
        return True

    def undo(
        self, done: int, feed: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]
    ) -> None:
        """Takes back what the first ``done`` streams copied of a request that did not fit."""
        for stream in self.streams[:done]:
            array = (outputs if stream.output else feed)[stream.tensor]
            del stream.data[len(stream.data) - array.nbytes :]

    def _fits(self, arrays: list[Any], rows: int) -> bool:
        """The slow check (another row count, or the first request since a fold), which takes
        the request's layout when the buffers are empty."""
        if not all(isinstance(a, np.ndarray) and a.ndim and len(a) == rows for a in arrays):
            return False
        if self.rows == 0:
            row_bytes = [a.nbytes // max(rows, 1) for a in arrays]
            if max(row_bytes, default=0) > STREAM_ROW_BYTES or rows == 0:
                return False
            for stream, array in zip(self.streams, arrays, strict=True):
                stream.dtype, stream.tail = array.dtype, array.shape[1:]
            self.row_bytes = sum(row_bytes)
            self.fold_at = max(1, min(self._fold_rows, self._fold_bytes // max(1, self.row_bytes)))
        elif not all(
            a.dtype == s.dtype and a.shape[1:] == s.tail
            for a, s in zip(arrays, self.streams, strict=True)
        ):
            return False
        self.plan = tuple(
            (s.output, s.tensor, a.dtype, a.shape, s.data.extend)
            for s, a in zip(self.streams, arrays, strict=True)
        )
        self.plan_rows = rows
        return True

    def drain(self) -> tuple[dict[tuple[bool, str], np.ndarray], int]:
        """Each tensor's rows as one array, and their count; the buffers start over."""
        arrays = {(s.output, s.tensor): s.array() for s in self.streams} if self.rows else {}
        rows = self.rows
        for stream in self.streams:
            stream.data = bytearray()  # the arrays above still read the old one
        self.rows, self.plan_rows, self.plan = 0, -1, ()  # the plan extended the old buffers
        self.hold_rows = -1
        return arrays, rows


def stream_columns(
    specs: Sequence[MonitorSpec], arrays: Mapping[tuple[bool, str], np.ndarray], rows: int
) -> np.ndarray:
    """The features of the streams' rows, (features, rows), in spec order.

    A column reducer's block is written transposed and cast in one pass into the matrix:
    casting first made a column-major block that ``concatenate`` then transposed again, the
    fold's costliest step (``benchmarks/bench_drift.py``)."""
    watched = [s for s in specs if s.reducer != "none"]
    blocks: list[np.ndarray] = []
    features = 0
    for spec in watched:
        joined = arrays[(spec.output, spec.tensor)]
        if spec.reducer == "columns" and joined.ndim >= 2:
            blocks.append(joined.reshape(len(joined), -1).T)  # a view: no copy yet
        else:
            blocks.append(_reduced(spec, joined))
        features += len(blocks[-1])
    out = np.empty((features, rows))
    at = 0
    for block in blocks:
        out[at : at + len(block)] = block
        at += len(block)
    return out


def held_columns(
    specs: Sequence[MonitorSpec], requests: list[tuple[Mapping[str, np.ndarray], int]]
) -> np.ndarray:
    """The monitored features of requests held by reference as a (features, rows) float64
    matrix, in spec order. Each watched tensor is joined across the requests (``_joined``)
    and reduced at once; when a tensor of a request does not hold that request's rows (a scalar
    output) or the tensors cannot be joined, every tensor goes through ``reduce_batch``, the
    reference, which reduces such a request on its own."""
    watched = [s for s in specs if s.reducer != "none"]
    counts = [n for _, n in requests]
    rows = sum(counts)
    if not watched:
        return np.empty((0, rows))
    from modelpack.monitor import reduce_batch

    blocks = []
    for spec in watched:
        arrays = [tensors[spec.tensor] for tensors, _ in requests]
        block: np.ndarray | None = None
        try:
            if list(map(len, arrays)) == counts:  # len() of a scalar: TypeError
                if spec.reducer == "image":
                    block = _image_features(spec, arrays)
                else:
                    block = _reduced(spec, _joined(arrays))
        except (ValueError, TypeError):  # shapes differ past the rows, not numbers
            block = None
        if block is None or block.shape[1] != rows:
            return np.ascontiguousarray(reduce_batch(specs, requests).T)
        blocks.append(block)
    return np.concatenate(blocks) if len(blocks) > 1 else blocks[0]


def _joined(arrays: list[np.ndarray]) -> np.ndarray:
    """The arrays joined along their rows: alike ones (dtype and shape) as their bytes, with
    one ``bytes.join`` (a tenth of what ``concatenate`` pays per array), others concatenated."""
    kinds = set(map(_DTYPE_SHAPE, arrays))
    if len(kinds) == 1:
        dtype, shape = kinds.pop()
        if shape and dtype.kind in "biuf":
            try:
                data = b"".join(arrays)  # type: ignore[arg-type]
            except TypeError:  # a view that is not contiguous
                pass
            else:
                return np.frombuffer(data, dtype).reshape(len(arrays) * shape[0], *shape[1:])
    return np.concatenate(arrays)


def _image_features(spec: MonitorSpec, arrays: list[np.ndarray]) -> np.ndarray:
    """Images joined as float32 (cast as they are joined: one pass over their pixels, not two)
    and reduced ``_IMAGE_CHUNK_BYTES`` at a time; (features, rows), the floats of
    ``modelpack.monitor.reduce``."""
    blocks, chunk, size = [], [], 0
    for array in arrays:
        chunk.append(array)
        size += array.size
        if size * 4 >= _IMAGE_CHUNK_BYTES:
            blocks.append(_chunk_features(spec, np.concatenate(chunk, dtype=np.float32)))
            chunk, size = [], 0
    if chunk:
        blocks.append(_chunk_features(spec, np.concatenate(chunk, dtype=np.float32)))
    return np.ascontiguousarray(np.concatenate(blocks, axis=1) if len(blocks) > 1 else blocks[0])


def _chunk_features(spec: MonitorSpec, joined: np.ndarray) -> np.ndarray:
    """One chunk's image features: channels first through ``image_stats`` in the joined
    images' own memory, channels last through ``reduce``, which moves them first (a copy of
    its own), as ``reduce`` decides."""
    from modelpack.monitor import image_stats, reduce

    channels = joined.shape[1] if joined.ndim == 4 else 0
    if channels and spec.param("channels", "first" if channels in (1, 3, 4) else "last") == "first":
        return image_stats(joined.reshape(len(joined), channels, -1), owned=True)
    return reduce(spec, joined).T


def _few_classes(joined: np.ndarray) -> np.ndarray:
    """The classes reducer's (class, confidence) of a few classes' probabilities, (2, rows):
    a class at a time over all rows, each compared with the best so far, in half the time of
    ``argmax`` across each row's few scores and the lookup of the score it picks. A strict
    ``>`` keeps the first of equal scores, as ``argmax`` does; ``maximum`` keeps a NaN, so a
    row with one has a NaN confidence and class, as in ``reduce``."""
    scores = np.ascontiguousarray(joined.T)
    out = np.zeros((2, scores.shape[1]))
    top, best = out[0], scores[0].copy()
    for c in range(1, len(scores)):
        top[scores[c] > best] = c
        np.maximum(best, scores[c], out=best)
    out[1] = best
    top[np.isnan(best)] = np.nan
    return out


def _reduced(spec: MonitorSpec, joined: np.ndarray) -> np.ndarray:
    """``reduce``'s features, transposed, without its float64 copy of a wide tensor for the
    two reducers most packs use."""
    if spec.reducer == "columns" and joined.ndim >= 2:
        return joined.reshape(len(joined), -1).T.astype(np.float64)
    if spec.reducer == "classes" and joined.ndim == 2 and spec.param("scores", "") == "probs":
        if 0 < joined.shape[1] <= _FEW_CLASSES:
            return _few_classes(joined)
        top = np.argmax(joined, axis=1)
        # argmax stops at a row's first NaN, so the score it picks is NaN iff the row has one
        confidence = joined[np.arange(len(joined)), top].astype(np.float64)
        out = np.stack([top.astype(np.float64), confidence])
        out[0, np.isnan(confidence)] = np.nan
        return out
    from modelpack.monitor import reduce

    return np.ascontiguousarray(reduce(spec, joined).T)


class Bins:
    """Counts many features at once in their baseline's bins, in place, with the bins of
    ``modelpack.monitor.Binner`` (bin 0 below the first edge, bin ``j`` in ``[e_{j-1}, e_j)``,
    the last at or above the last edge, NaN apart).

    A binary search per value (``searchsorted``) costs tens of nanoseconds a value, for its
    unpredictable branches; comparing every value with every edge at once is branch-free and
    vectorised: the count at or above each edge, and a bin is the difference of two of those.
    The comparisons' booleans are summed eight at a time, as the bytes of 64-bit words: summing
    booleans one by one into int64 cost three times the comparisons themselves.
    """

    def __init__(self, edges: list[list[float]]) -> None:
        self.edges = edges
        self.sizes = np.asarray([len(e) for e in edges], dtype=np.intp)
        widest = max((len(e) for e in edges), default=1)
        # NaN padding: no value is at or above it, so a feature's last own bin keeps +inf.
        self._padded = np.full((len(edges), widest, 1), np.nan)
        for i, e in enumerate(edges):
            self._padded[i, : len(e), 0] = e
        self.width = widest + 1
        # Each edge rounded up to a float32 (the smallest at or above it): a float32 value is
        # at or above an edge exactly when it is at or above that one, so features whose values
        # are all float32 (``float32_exact``) are compared in float32, in a third of the time.
        with np.errstate(over="ignore"):
            up = self._padded.astype(np.float32)
            low = up.astype(np.float64) < self._padded
            up[low] = np.nextafter(up[low], np.float32(np.inf))
        self._padded32 = up

    def add(
        self, columns: np.ndarray, counts: np.ndarray, exact32: bool = False
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Adds a (features, rows) matrix's values to ``counts``; returns NaN per feature, sums
        and sums of squares (NaN left out). ``exact32``: every value is a float32 (or NaN), so
        they are compared in float32 (the sums stay in float64)."""
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: the sum is NaN, sent as 0
            sums = columns.sum(axis=1)
            if np.isfinite(sums).all():  # the common case: no NaN, one pass finds it
                nan = np.zeros(len(columns), dtype=np.int64)
                squares = np.einsum("ij,ij->i", columns, columns)
            else:
                nan = np.isnan(columns).sum(axis=1)
                sums, squares = np.nansum(columns, axis=1), np.nansum(columns * columns, axis=1)
        features, edges = self._padded.shape[:2]
        rows = columns.shape[1]
        at_or_above = np.zeros((features, edges), dtype=np.int64)
        if rows and features and edges:
            padded = self._padded32 if exact32 else self._padded
            # The rows padded with -inf (above no edge) to whole blocks, or to whole words under
            # one block, in one copy (the cast to float32 with it): a pass over a short tail of
            # its own cost more than a whole block's.
            if rows < _BLOCK:
                width = -(-rows // 64) * 64
                words = width // 8
            else:
                width, words = -(-rows // _BLOCK) * _BLOCK, _BLOCK // 8
            values = np.full((features, width), -np.inf, dtype=padded.dtype)
            values[:, :rows] = columns
            blocks = _COMPARE_BYTES // (_BLOCK * features * edges)
            step = max(_MIN_PASS_BLOCKS, blocks) * _BLOCK
            for start in range(0, width, step):
                at_or_above += _above(values[:, start : start + step], padded, words)
        valid = (rows - nan)[:, None]
        ladder = np.concatenate([valid, at_or_above, np.zeros_like(valid)], axis=1)
        counts += ladder[:, :-1] - ladder[:, 1:]
        return nan, sums, squares

    def trim(self, counts: np.ndarray) -> list[list[int]]:
        """Each feature's own bins (the padding's always-empty bins left out)."""
        return [[int(c) for c in counts[i, : n + 1]] for i, n in enumerate(self.sizes)]


def _above(block: np.ndarray, padded: np.ndarray, words: int = _BLOCK // 8) -> np.ndarray:
    """Per feature and edge, the values of a (features, rows) matrix at or above it, the rows
    a whole number of groups of ``words`` words of 8 rows (at most 128 words: a byte's sum
    never carries)."""
    features, edges = padded.shape[:2]
    above = block[:, None, :] >= padded
    grouped = above.view(np.uint64).reshape(features, edges, -1, words)
    per_byte = np.add.reduce(grouped, axis=3).view(np.uint8)
    return per_byte.reshape(features, edges, -1).sum(axis=2, dtype=np.int64)


# Dtypes every value of which is a float32: a ``columns`` feature of such a tensor, a class's
# probability or index, is compared in float32 (``Bins.add``).
_EXACT32 = frozenset(
    np.dtype(t) for t in ("float16", "float32", "int8", "uint8", "int16", "uint16", "bool")
)


def float32_exact(spec: MonitorSpec, dtype: np.dtype[Any], shape: tuple[int, ...]) -> bool:
    """Whether every feature ``reduce`` gives of a tensor of this dtype and shape is a float32
    (or NaN): the image reducer's always are (``monitor.image_stats``); a column's and a
    probability's when the tensor's are; a class index below 2**24 is."""
    if spec.reducer in ("none", "image"):
        return True
    if spec.reducer == "columns":
        return dtype in _EXACT32
    if spec.reducer == "classes":
        if len(shape) <= 1:
            return dtype in _EXACT32
        probs = spec.param("scores", "") == "probs" and dtype == np.float32
        return probs and len(shape) == 2 and shape[1] < 1 << 24
    return False
