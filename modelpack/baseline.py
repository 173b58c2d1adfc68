"""baseline.json, schema version 1: the distribution of each monitored feature on the data a
pack was made with, the reference a device's summaries and the cloud's drift verdicts compare to.

For each feature: bin edges at the baseline's quantiles (``bins``, 10-20, fewer where values
repeat), the counts in them, mean, standard deviation, the share of NaN and of values out of
range; for a class output, the class frequencies and the mean confidence. The file is listed
and hashed in the signed manifest like every other file: a pack without it is still valid, it
just has no drift monitoring.

Pure numpy and pydantic: the edge agent reads it on every device.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from modelpack.errors import ConfigError, PackError, first_problem
from modelpack.manifest import BASELINE_FILE as BASELINE_FILE  # re-exported for its readers
from modelpack.monitor import (
    MAX_FEATURES,
    Binner,
    MonitorSpec,
    TensorInfo,
    default_spec,
    feature_names,
    probabilities,
    reduce,
)

SCHEMA_VERSION = 1
DEFAULT_BINS = 16
MAX_BASELINE_ROWS = 20_000


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SpecDoc(_Frozen):
    tensor: str = Field(min_length=1, max_length=128)
    reducer: Literal["columns", "summary", "image", "tokens", "classes", "none"]
    params: dict[str, str] = Field(default_factory=dict, max_length=4)
    output: bool = False

    def spec(self) -> MonitorSpec:
        return MonitorSpec(
            self.tensor, self.reducer, tuple(sorted(self.params.items())), self.output
        )


class FeatureBaseline(_Frozen):
    name: str = Field(min_length=1, max_length=160)
    tensor: str
    output: bool = False
    kind: Literal["numeric", "categorical"] = "numeric"
    edges: list[float] = Field(min_length=2, max_length=1001)
    counts: list[int]  # len(edges) + 1: below range, the bins, at or above the range's end
    n: int = Field(ge=0)  # rows with a value (not NaN)
    mean: float | None = None
    std: float | None = None
    nan_share: float = Field(ge=0, le=1)
    out_of_range_share: float = Field(ge=0, le=1)
    labels: list[str] = Field(default_factory=list)  # class names of a categorical feature
    mean_confidence: float | None = None  # a class feature: the mean top-class probability

    @field_validator("edges")
    @classmethod
    def _increasing(cls, value: list[float]) -> list[float]:
        if not all(math.isfinite(v) for v in value) or any(
            b <= a for a, b in itertools.pairwise(value)
        ):
            raise ValueError("edges must be finite and strictly increasing")
        return value

    @property
    def frequencies(self) -> list[float]:
        total = max(sum(self.counts), 1)
        return [c / total for c in self.counts]


class Baseline(_Frozen):
    schema_version: Literal[1] = 1
    rows: int = Field(ge=0)
    bins: int = Field(ge=2, le=100)
    monitor: list[SpecDoc]
    features: list[FeatureBaseline] = Field(max_length=MAX_FEATURES)

    def specs(self) -> list[MonitorSpec]:
        return [s.spec() for s in self.monitor]

    def binner(self) -> Binner:
        return Binner([f.edges for f in self.features])

    def to_bytes(self) -> bytes:
        return (self.model_dump_json(indent=1) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Baseline:
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise PackError(f"{BASELINE_FILE}: {first_problem(exc, 'baseline')}") from exc


def _numeric(values: np.ndarray, bins: int) -> tuple[list[float], dict[str, float | None]]:
    finite = values[np.isfinite(values)]
    if not len(finite):
        return [0.0, 1.0], {"mean": None, "std": None}
    lo, hi = float(finite.min()), float(finite.max())
    inner = np.quantile(finite, np.linspace(0, 1, bins + 1)[1:-1]) if bins > 1 else []
    top = float(np.nextafter(hi, np.inf))  # the maximum itself is in range
    edges = sorted({lo, *(float(q) for q in inner if lo < q < top), top})
    return edges, {"mean": float(finite.mean()), "std": float(finite.std())}


def _feature(
    name: str, spec: MonitorSpec, values: np.ndarray, bins: int, labels: Sequence[str]
) -> FeatureBaseline:
    categorical = spec.reducer == "classes" and name.endswith(".class")
    if categorical:
        finite = values[np.isfinite(values)]
        classes = max(len(labels), int(finite.max()) + 1 if len(finite) else 1, 2)
        edges = [c - 0.5 for c in range(classes + 1)]
        stats: dict[str, float | None] = {"mean": None, "std": None}
    else:
        edges, stats = _numeric(values, bins)
    counts, nan = Binner([edges]).count(values.reshape(-1, 1))
    row = [int(c) for c in counts[0, : len(edges) + 1]]
    total = max(len(values), 1)
    return FeatureBaseline(
        name=name,
        tensor=spec.tensor,
        output=spec.output,
        kind="categorical" if categorical else "numeric",
        edges=edges,
        counts=row,
        n=int(len(values) - nan[0]),
        nan_share=float(nan[0]) / total,
        out_of_range_share=(row[0] + row[-1]) / total,
        labels=list(labels) if categorical else [],
        **stats,
    )


def _within_cap(
    chosen: list[tuple[MonitorSpec, np.ndarray]], named: set[str]
) -> list[tuple[MonitorSpec, np.ndarray]]:
    """Defaults that would pass ``MAX_FEATURES`` together (64 input columns beside a class
    output) summarise their widest ``columns`` tensors instead, so a plain model never needs
    --monitor; only what the user named can exceed the cap (and is refused)."""
    count = sum(len(feature_names(s, a)) for s, a in chosen)
    widest = sorted(
        (i for i, (s, _) in enumerate(chosen) if s.reducer == "columns" and s.tensor not in named),
        key=lambda i: -len(feature_names(*chosen[i])),
    )
    for i in widest:
        if count <= MAX_FEATURES:
            break
        spec, sample = chosen[i]
        summary = MonitorSpec(spec.tensor, "summary", (), spec.output)
        count += len(feature_names(summary, sample)) - len(feature_names(spec, sample))
        chosen[i] = (summary, sample)
    return chosen


def build_baseline(
    tensors: Mapping[str, np.ndarray],
    infos: Sequence[TensorInfo],
    monitor: Sequence[MonitorSpec] = (),
    bins: int = DEFAULT_BINS,
    labels: Sequence[str] = (),
) -> Baseline:
    """The baseline of ``tensors`` (inputs and the model's outputs on them, rows first).

    ``monitor`` overrides the default reducer of the tensors it names; ``infos`` lists every
    input and output of the model."""
    if not 2 <= bins <= 100:
        raise ConfigError(f"bins must be 2-100, got {bins}")
    known = {i.name: i for i in infos}
    named = {s.tensor: s for s in monitor}
    unknown = sorted(set(named) - set(known))
    if unknown:
        raise ConfigError(
            f"--monitor names {unknown[0]!r}, which the model has not (it has "
            f"{', '.join(sorted(known))})"
        )
    rows = min((len(np.asarray(tensors[i.name])) for i in infos if i.name in tensors), default=0)
    chosen = []
    for info in infos:
        sample = tensors.get(info.name)
        if sample is None:
            continue
        sample = np.asarray(sample)[:MAX_BASELINE_ROWS]
        spec = named.get(info.name) or default_spec(info, sample, len(labels))
        params = _scores(spec, sample)
        chosen.append((MonitorSpec(spec.tensor, spec.reducer, params, info.output), sample))
    chosen = _within_cap(chosen, set(named))
    specs, features = [], []
    for spec, sample in chosen:
        specs.append(spec)
        names = feature_names(spec, sample)
        matrix = reduce(spec, sample)
        for column, name in enumerate(names):
            features.append(_feature(name, spec, matrix[:, column], bins, labels))
    if len(features) > MAX_FEATURES:
        raise ConfigError(
            f"{len(features)} monitored features; at most {MAX_FEATURES} (name wide tensors "
            "with --monitor NAME=summary)"
        )
    features = _with_confidence(features)
    docs = [
        SpecDoc.model_validate(
            {"tensor": s.tensor, "reducer": s.reducer, "params": dict(s.params), "output": s.output}
        )
        for s in specs
    ]
    return Baseline(rows=min(rows, MAX_BASELINE_ROWS), bins=bins, monitor=docs, features=features)


def _scores(spec: MonitorSpec, sample: np.ndarray) -> tuple[tuple[str, str], ...]:
    """A class output's scores are probabilities or logits: decided here, once, so a device
    does not test every batch."""
    params = dict(spec.params)
    if spec.reducer == "classes" and sample.ndim == 2 and "scores" not in params:
        params["scores"] = "probs" if probabilities(sample) else "logits"
    return tuple(sorted(params.items()))


def _with_confidence(features: list[FeatureBaseline]) -> list[FeatureBaseline]:
    """A class feature carries its tensor's mean confidence."""
    means = {f.tensor: f.mean for f in features if f.name.endswith(".confidence")}
    return [
        f.model_copy(update={"mean_confidence": means.get(f.tensor)})
        if f.kind == "categorical"
        else f
        for f in features
    ]


def read_baseline(root: Path) -> Baseline | None:
    """The baseline of a verified pack directory, or None when it has none."""
    path = root / BASELINE_FILE
    if not path.is_file():
        return None
    return Baseline.from_bytes(path.read_bytes())


def attach_baseline(root: Path, baseline: Baseline, key: Path | None = None) -> Path:
    """Add (or replace) baseline.json in a pack directory and list it in the manifest.

    The manifest changes, so a signature over the old one no longer holds: it is removed, and
    written again when ``key`` is given."""
    from modelpack.manifest import MANIFEST_FILE, SIGNATURE_FILE, Manifest
    from modelpack.pack import list_files
    from modelpack.writer import sign_pack

    manifest = Manifest.from_bytes((root / MANIFEST_FILE).read_bytes())
    (root / SIGNATURE_FILE).unlink(missing_ok=True)
    (root / BASELINE_FILE).write_bytes(baseline.to_bytes())
    updated = manifest.model_copy(update={"files": list_files(root)})
    tmp = root / f".{MANIFEST_FILE}.tmp"
    tmp.write_bytes(updated.to_bytes())
    os.replace(tmp, root / MANIFEST_FILE)
    if key is not None:
        sign_pack(root, key)
    return root / BASELINE_FILE


def tensor_infos(manifest: object) -> list[TensorInfo]:
    """A manifest's inputs and outputs as ``TensorInfo`` (masks from its sequence inputs)."""
    from modelpack.manifest import Manifest

    assert isinstance(manifest, Manifest)
    masks = {s.mask_input for s in manifest.sequence if s.mask_input}
    pads = {s.input: s.pad_value for s in manifest.sequence}
    infos = [
        TensorInfo(
            t.name,
            t.dtype,
            t.shape,
            mask=t.name in masks or "mask" in t.name or "token_type" in t.name,
            pad=pads.get(t.name, 0),
        )
        for t in manifest.inputs
    ]
    infos += [TensorInfo(t.name, t.dtype, t.shape, output=True) for t in manifest.outputs]
    return infos


def make_baseline(
    root: Path,
    data: Mapping[str, np.ndarray],
    monitor: Sequence[MonitorSpec] = (),
    key: Path | None = None,
    bins: int = DEFAULT_BINS,
) -> Baseline:
    """Run a pack's model on ``data`` (one array per input, rows first), record the baseline of
    inputs and outputs, and attach it to the pack (signed again with ``key``)."""
    from modelpack.manifest import MANIFEST_FILE, MODEL_FILE, Manifest
    from modelpack.predictor import Predictor

    manifest = Manifest.from_bytes((root / MANIFEST_FILE).read_bytes())
    missing = [t.name for t in manifest.inputs if t.name not in data]
    if missing:
        raise ConfigError(f"the baseline data has no array {missing[0]!r} (a model input)")
    flat = [t.name for t in manifest.inputs if np.ndim(data[t.name]) == 0]
    if flat:
        raise ConfigError(
            f"input {flat[0]!r} is a scalar: a baseline needs rows on axis 0 of every input "
            "(build the pack without --monitor for this model)"
        )
    inputs = {t.name: np.asarray(data[t.name])[:MAX_BASELINE_ROWS] for t in manifest.inputs}
    predictor = Predictor(root / MODEL_FILE, manifest.inputs, manifest.outputs)
    rows = min(len(v) for v in inputs.values())
    step = 256 if all(t.batch_dynamic for t in manifest.inputs) else 1
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, rows, step):
        parts.append(predictor.run({k: v[start : start + step] for k, v in inputs.items()}))
    outputs = {name: np.concatenate([p[name] for p in parts]) for name in predictor.outputs}
    labels = manifest.labels
    baseline = build_baseline(
        {**{k: v[:rows] for k, v in inputs.items()}, **outputs},
        tensor_infos(manifest),
        monitor,
        bins,
        labels,
    )
    attach_baseline(root, baseline, key)
    return baseline


def read_data(path: Path) -> dict[str, np.ndarray]:
    """Arrays of an .npz of baseline data (one per model input; ``labels`` is left aside)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files if k != "labels"}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a readable .npz of arrays: {exc}") from exc
