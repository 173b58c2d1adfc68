"""Input data for the search: loaded from ``.npz``, split, or synthesized from the io signature."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modelpack import TensorSpec
from modelpack.errors import ConfigError, EdgebentoError
from optimize.npz import check_fits, open_npz

LABELS = "labels"
# Sizes tried, in order, for a symbolic dim that is not the batch: the first one the model runs.
SYMBOLIC_SIZES = (8, 16, 4, 1, 32, 64)


@dataclass(frozen=True)
class Dataset:
    """One array per model input (rows along axis 0 for batched inputs), optional labels."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    batched: frozenset[str]  # inputs split by row; the others (scalars, state) go whole
    synthetic: bool = False

    @property
    def rows(self) -> int:
        for name in self.batched:
            return int(self.inputs[name].shape[0])
        return 1

    def take(self, index: np.ndarray | slice) -> Dataset:
        inputs = {k: (v[index] if k in self.batched else v) for k, v in self.inputs.items()}
        labels = None if self.labels is None else self.labels[index]
        return Dataset(inputs, labels, self.batched, self.synthetic)

    def batches(self, size: int) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, self.rows, size):
            yield self.take(slice(start, start + size)).inputs


def _batched(specs: Sequence[TensorSpec], inputs: dict[str, np.ndarray]) -> frozenset[str]:
    """Inputs with a dynamic first dim and at least one axis: those are split by row."""
    return frozenset(s.name for s in specs if s.batch_dynamic and inputs[s.name].ndim >= 1)


def load_npz(path: Path, specs: Sequence[TensorSpec]) -> Dataset:
    """Read ``path`` and check it has an array for every input, with its dtype and rank."""
    try:
        arrays = open_npz(path)  # arrays read when first asked for, under a size cap
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a readable .npz file: {exc}") from exc
    inputs: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.name not in arrays:
            raise ConfigError(
                f"{path.name} has no array {spec.name!r}; it holds {', '.join(arrays) or 'nothing'}"
                f" and the model takes {', '.join(s.name for s in specs)}"
            )
        array = arrays[spec.name]
        if spec.shape is not None and array.ndim != len(spec.shape):
            raise ConfigError(
                f"{path.name}: {spec.name!r} has rank {array.ndim}; the model wants {len(spec.shape)}"
            )
        inputs[spec.name] = array.astype(spec.dtype, copy=False)
    labels = arrays.get(LABELS)
    batched = _batched(specs, inputs)
    rows = {inputs[n].shape[0] for n in batched}
    if len(rows) > 1:
        raise ConfigError(
            f"{path.name}: the batched inputs have different row counts {sorted(rows)}"
        )
    if labels is not None and rows and labels.shape[0] not in rows:
        raise ConfigError(f"{path.name}: {labels.shape[0]} labels for {rows.pop()} rows")
    return Dataset(inputs, labels, batched)


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


def _shape(spec: TensorSpec, rows: int, size: int) -> list[int]:
    if spec.shape is None:
        return [rows]
    return [
        d if isinstance(d, int) else (rows if axis == 0 else size)
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
    for size in SYMBOLIC_SIZES:
        inputs = {s.name: _random(s, _shape(s, rows, size), rng) for s in specs}
        try:
            predictor.run(inputs, validate=False)
        except EdgebentoError as exc:  # the model refuses this size: try the next one
            errors.append(f"{size}: {str(exc).splitlines()[0]}")
            continue
        return Dataset(inputs, None, _batched(specs, inputs), synthetic=True)
    raise ConfigError(
        "no synthetic input the model accepts (tried symbolic sizes "
        f"{', '.join(map(str, SYMBOLIC_SIZES))}); pass --data. Last error: {errors[-1]}"
    )
