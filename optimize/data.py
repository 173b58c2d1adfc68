"""Input data for the search: loaded from ``.npz``, split, or synthesized from the io signature."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from modelpack import TensorSpec
from modelpack.errors import ConfigError, EdgebentoError
from optimize.npz import check_fits, open_npz

LABELS = "labels"
# Sizes tried, in order, for a symbolic dim that is not the batch: the first one the model runs.
SYMBOLIC_SIZES = (8, 16, 4, 1, 32, 64, 128, 256, 512)


@dataclass(frozen=True)
class Dataset:
    """One array per model input, optional labels, and each input's batch axis.

    ``axes`` maps an input to the axis its rows lie along (axis 1 for an LSTM state
    ``[layers, batch, hidden]``); inputs without an entry (scalars, fixed tables, feeds that
    cannot be split) go into every batch whole.
    """

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    axes: Mapping[str, int] = field(default_factory=dict)
    synthetic: bool = False

    @property
    def batched(self) -> frozenset[str]:
        return frozenset(self.axes)

    @property
    def rows(self) -> int:
        for name, axis in self.axes.items():
            return int(self.inputs[name].shape[axis])
        return 1

    def take(self, index: np.ndarray | slice) -> Dataset:
        inputs = {
            k: (np.take(v, _indices(index, v.shape[self.axes[k]]), axis=self.axes[k]))
            if k in self.axes
            else v
            for k, v in self.inputs.items()
        }
        labels = None
        if self.labels is not None:
            labels = self.labels[index] if self.axes else self.labels
        return Dataset(inputs, labels, self.axes, self.synthetic)

    def whole(self) -> Dataset:
        """The same feeds, never split: for models whose rows cannot be taken apart."""
        return Dataset(self.inputs, self.labels, {}, self.synthetic)

    def batches(self, size: int) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, self.rows, size):
            yield self.take(slice(start, start + size)).inputs


def _indices(index: np.ndarray | slice, length: int) -> np.ndarray:
    return np.arange(length)[index] if isinstance(index, slice) else np.asarray(index)


_BATCH_NAME = re.compile(r"(^|_)(batch|n|b|bs|batch_size|n_batch)($|_)", re.IGNORECASE)


def batch_dim_name(specs: Sequence[TensorSpec]) -> str | None:
    """The symbolic dim that counts rows: named like a batch, else the one most inputs lead with.

    Exporters name it ``batch``, ``N`` or ``batch_size`` and put it where the model wants it
    (axis 1 for recurrent state), so the name, not the position, says where rows lie.
    """
    counts: Counter[str] = Counter()
    first: Counter[str] = Counter()
    for spec in specs:
        names = {d for d in spec.shape or [] if isinstance(d, str)}
        counts.update(names)
        if spec.shape and isinstance(spec.shape[0], str):
            first[spec.shape[0]] += 1
    # Without a batch-like name, only a dim that leads some input counts rows: a shared '?' in
    # the middle is an image side or a sequence length.
    named = [n for n in counts if _BATCH_NAME.search(n) or first[n]]
    if not named:
        return None
    return max(named, key=lambda n: (bool(_BATCH_NAME.search(n)), first[n], counts[n], n))


def batch_axes(specs: Sequence[TensorSpec], inputs: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Each input's batch axis, from the io signature and the data; unsplittable ones left out.

    The axis is where the batch dim's name sits, else axis 0 when the first dim is dynamic.
    Inputs whose size along it disagrees with the rest are not split (they go whole).
    """
    name = batch_dim_name(specs)
    guess: dict[str, int] = {}
    for spec in specs:
        array = inputs[spec.name]
        if array.ndim == 0:
            continue  # a scalar: the same in every batch
        dims = spec.shape
        if dims is None:
            guess[spec.name] = 0
        elif name is not None and name in dims and len(dims) == array.ndim:
            guess[spec.name] = dims.index(name)
        elif dims and not isinstance(dims[0], int) and (name is None or dims[0] is None):
            guess[spec.name] = 0
    sizes = Counter(inputs[n].shape[a] for n, a in guess.items())
    if not sizes:
        return {}
    rows = max(sizes, key=lambda r: (sizes[r], r))
    return {n: a for n, a in guess.items() if inputs[n].shape[a] == rows}


def load_npz(path: Path, specs: Sequence[TensorSpec]) -> Dataset:
    """Read ``path`` and check it has an array for every input, with its dtype and rank."""
    try:
        arrays = open_npz(path)  # arrays read when first asked for, under a size cap
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a readable .npz file: {exc}") from exc
    inputs: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.name not in arrays:
            # The names are the model's, which a user may never have chosen (Keras names an
            # unnamed Input input_layer): say how to write the file.
            named = ", ".join(f"{s.name}=..." for s in specs)
            raise ConfigError(
                f"{path.name} has no array {spec.name!r}; it holds {', '.join(arrays) or 'nothing'}"
                f" and the model takes {', '.join(s.name for s in specs)}: name each array after"
                f" the input it feeds, np.savez({path.name!r}, {named}, labels=...)"
            )
        array = arrays[spec.name]
        if spec.shape is not None and array.ndim != len(spec.shape):
            raise ConfigError(
                f"{path.name}: {spec.name!r} has rank {array.ndim}; the model wants {len(spec.shape)}"
            )
        inputs[spec.name] = array.astype(spec.dtype, copy=False)
    labels = arrays.get(LABELS)
    data = Dataset(inputs, labels, batch_axes(specs, inputs))
    # The rows' axis is proven later by running (optimize.axes); here only a count that no
    # input has on any axis is plainly wrong.
    sizes = {
        int(size)
        for spec in specs
        for axis, size in enumerate(inputs[spec.name].shape)
        if spec.shape is None or not isinstance(spec.shape[axis], int)
    }
    if labels is not None and labels.ndim >= 1 and labels.shape[0] not in sizes:
        raise ConfigError(f"{path.name}: {labels.shape[0]} labels for {data.rows} rows")
    return data


def split(data: Dataset, eval_fraction: float = 0.3, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(calibration, held-back eval) by a seeded shuffle; both keep at least one row."""
    if data.rows < 2:
        return data, data
    order = np.random.default_rng(seed).permutation(data.rows)
    n_eval = min(data.rows - 1, max(1, round(data.rows * eval_fraction)))
    return data.take(np.sort(order[n_eval:])), data.take(np.sort(order[:n_eval]))


def _random(spec: TensorSpec, shape: list[int], rng: np.random.Generator) -> np.ndarray:
    dtype = np.dtype(spec.dtype)
    check_fits(f"a synthetic input {spec.name!r}", shape, dtype)  # absurd dims: a clear error
    if dtype.kind == "f":  # drawn in float32 unless float64 is wanted: no 2x-size copy
        return rng.standard_normal(shape, np.float64 if dtype.itemsize > 4 else np.float32).astype(
            dtype, copy=False
        )
    if dtype.kind in "iu":
        # Small non-negative integers are valid token ids, indices and counts alike.
        return rng.integers(0, 8, size=shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    raise ConfigError(
        f"input {spec.name!r} of type {spec.dtype} cannot be synthesized; pass --data"
    )


def _shape(spec: TensorSpec, rows: int, size: int, batch: str | None) -> list[int]:
    if spec.shape is None:
        return [rows]
    return [
        d
        if isinstance(d, int)
        else (rows if d == batch or (d is None and axis == 0 and batch is None) else size)
        for axis, d in enumerate(spec.shape)
    ]


def synthesize(model: Path, specs: Sequence[TensorSpec], rows: int = 64, seed: int = 0) -> Dataset:
    """Random inputs for every spec, with symbolic dims set to sizes the model accepts."""
    from modelpack import Predictor, PredictorOptions
    from modelpack.iosig import read_io_signature

    _, outputs = read_io_signature(model)
    predictor = Predictor(model, specs, outputs, PredictorOptions(warmup=False))
    rng = np.random.default_rng(seed)
    errors = []
    batch = batch_dim_name(specs)
    for size in SYMBOLIC_SIZES:
        inputs = {s.name: _random(s, _shape(s, rows, size, batch), rng) for s in specs}
        try:
            predictor.run(inputs, validate=False)
        except EdgebentoError as exc:  # the model refuses this size: try the next one
            errors.append(f"{size}: {str(exc).splitlines()[0]}")
            continue
        return Dataset(inputs, None, batch_axes(specs, inputs), synthetic=True)
    raise ConfigError(
        "no synthetic input the model accepts (tried symbolic sizes "
        f"{', '.join(map(str, SYMBOLIC_SIZES))}); pass --data. Last error: {errors[-1]}"
    )
