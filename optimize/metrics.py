"""Fidelity metrics: how a candidate's outputs compare with FP32's where the outputs are used.

A metric compares one output of FP32 (``reference``) with the same output of a candidate, both
with rows on axis 0, and gives one score per row (reduced by min, mean or max) or one number.
``--metric [OUTPUT=]NAME[@REDUCTION][>=BOUND|<=BOUND]`` picks them; NAME is a built-in below
or ``module:function``, a user metric with the signature of ``Metric`` (as Olive's custom
metrics). Without ``--metric`` every output gets the metric its shape calls for (``defaults``).

Sequence outputs ``[rows, tokens, ...]`` of a model with an attention-mask input are masked:
padding is noise that every consumer drops, so only real tokens are compared.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from modelpack.errors import ConfigError

Outputs = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Context:
    """What a metric may look at beside the two outputs: the inputs, labels and the mask."""

    output: str
    inputs: Mapping[str, np.ndarray]  # rows on axis 0
    labels: np.ndarray | None
    mask: np.ndarray | None  # [rows, tokens] of 0/1, when the output is a masked sequence


Metric = Callable[[np.ndarray, np.ndarray, Context], "float | np.ndarray"]


def _rows(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1).astype(np.float64) if x.ndim else x.reshape(1, 1)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine along the last axis; identical vectors (zeros included) count as 1."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    same = np.all(a == b, axis=-1)
    return np.where(same, 1.0, (a * b).sum(-1) / np.where(norms == 0, 1.0, norms))


def _masked(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    return x if mask is None else x * mask.reshape(*mask.shape, *([1] * (x.ndim - 2)))


# A row whose values all stay this close to zero, as a share of the output's largest value over
# all rows, has no direction: an empty probability map (PP-OCR det on a crop without text).
NO_DIRECTION = 1e-4


def cosine(ref: np.ndarray, out: np.ndarray, ctx: Context) -> np.ndarray:
    """Per row, over the row's real elements (padding tokens are zeroed in both).

    A row of one number (a probability, a score) has a cosine of +-1 whatever its value, so
    such outputs are compared as one vector over all rows. Rows where FP32 and the candidate
    both stay within ``NO_DIRECTION`` of zero agree (1.0): FP32's 3e-6 against int8's 0 read
    as a cosine of 0 and hid every int8 candidate of PP-OCR det behind it.
    """
    a, b = _rows(_masked(ref, ctx.mask)), _rows(_masked(out, ctx.mask))
    if a.shape[1] == 1:
        return _cos(a.reshape(1, -1), b.reshape(1, -1))
    found = _cos(a, b)
    if a.size:
        tiny = NO_DIRECTION * float(np.max(np.abs(a)))
        flat = (np.max(np.abs(a), axis=1) <= tiny) & (np.max(np.abs(b), axis=1) <= tiny)
        found = np.where(flat, 1.0, found)
    return found


def _pool(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    if x.ndim < 3:
        return _rows(x)
    if mask is None:
        return x.astype(np.float64).mean(axis=1).reshape(x.shape[0], -1)
    weights = mask.astype(np.float64).reshape(*mask.shape, *([1] * (x.ndim - 2)))
    pooled = (x * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
    return pooled.reshape(x.shape[0], -1)


def pooled_cosine(ref: np.ndarray, out: np.ndarray, ctx: Context) -> np.ndarray:
    """Cosine of the mean over real tokens, as sentence-transformers pools an embedding."""
    return _cos(_pool(ref, ctx.mask), _pool(out, ctx.mask))


def first_token_cosine(ref: np.ndarray, out: np.ndarray, ctx: Context) -> np.ndarray:
    """Cosine of the first token ([CLS] pooling)."""
    if ref.ndim < 3:
        return cosine(ref, out, ctx)
    return _cos(_rows(ref[:, 0]), _rows(out[:, 0]))


def token_cosine(ref: np.ndarray, out: np.ndarray, ctx: Context) -> np.ndarray:
    """Per row, the worst cosine of any real token: the strictest sequence comparison."""
    if ref.ndim < 3:
        return cosine(ref, out, ctx)
    per_token = _cos(ref.reshape(*ref.shape[:2], -1), out.reshape(*out.shape[:2], -1))
    if ctx.mask is not None:
        per_token = np.where(ctx.mask.astype(bool), per_token, 1.0)
    return per_token.min(axis=1)


def top1(ref: np.ndarray, out: np.ndarray, ctx: Context) -> np.ndarray:
    """Share of rows (or real tokens) whose argmax over the last axis agrees with FP32."""
    same = (ref.argmax(-1) == out.argmax(-1)).astype(np.float64)
    if same.ndim == 2 and ctx.mask is not None and ctx.mask.shape == same.shape:
        return (same * ctx.mask).sum(1) / np.maximum(ctx.mask.sum(1), 1)
    return same.reshape(same.shape[0], -1).mean(1) if same.ndim else same.reshape(1)


def accuracy(ref: np.ndarray, out: np.ndarray, ctx: Context) -> np.ndarray:
    """Share of rows whose argmax is the label (needs ``labels`` in the data)."""
    if ctx.labels is None:
        raise ConfigError("the accuracy metric needs labels: add a 'labels' array to --data")
    return (out.reshape(out.shape[0], -1).argmax(-1) == ctx.labels.reshape(-1)).astype(float)


def max_abs(ref: np.ndarray, out: np.ndarray, ctx: Context) -> np.ndarray:
    """Per row, the largest absolute difference (lower is better)."""
    diff = np.abs(_masked(ref, ctx.mask).astype(np.float64) - _masked(out, ctx.mask))
    return _rows(diff).max(axis=1)


def equal(ref: np.ndarray, out: np.ndarray, ctx: Context) -> np.ndarray:
    """Share of rows that are exactly equal: for integer and boolean outputs."""
    return np.all(_rows(ref) == _rows(out), axis=1).astype(np.float64)


@dataclass(frozen=True)
class Builtin:
    function: Metric
    reduction: str
    higher_is_better: bool = True


BUILTINS: dict[str, Builtin] = {
    "cosine": Builtin(cosine, "min"),
    "pooled-cosine": Builtin(pooled_cosine, "min"),
    "first-token-cosine": Builtin(first_token_cosine, "min"),
    "token-cosine": Builtin(token_cosine, "min"),
    "top1": Builtin(top1, "mean"),
    "accuracy": Builtin(accuracy, "mean"),
    "max-abs": Builtin(max_abs, "max", higher_is_better=False),
    "equal": Builtin(equal, "mean"),
}
REDUCTIONS: dict[str, Callable[[np.ndarray], float]] = {
    "min": lambda v: float(np.min(v)),
    "mean": lambda v: float(np.mean(v)),
    "max": lambda v: float(np.max(v)),
}
_SPEC = re.compile(
    r"^(?:(?P<output>[^=<>]+)=)?(?P<name>[^@<>=]+?)(?:@(?P<reduction>\w+))?"
    r"(?:(?P<op>>=|<=)(?P<bound>[-+0-9.eE]+))?$"
)


@dataclass(frozen=True)
class MetricSpec:
    """One ``--metric``: which output, which metric, how its rows reduce, an optional bound."""

    name: str
    output: str | None = None  # None: every output it applies to
    reduction: str | None = None  # None: the metric's own default
    bound: float | None = None  # None: within --max-drop of FP32's own score
    decides: bool = True

    @classmethod
    def parse(cls, text: str) -> MetricSpec:
        match = _SPEC.match(text.strip())
        if match is None:
            raise ConfigError(f"--metric {text!r}: expected [OUTPUT=]NAME[@min|mean|max][>=X|<=X]")
        name = match["name"].strip()
        if name not in BUILTINS and ":" not in name:
            raise ConfigError(
                f"--metric {text!r}: unknown metric {name!r}; use one of "
                f"{', '.join(BUILTINS)} or module:function"
            )
        if match["reduction"] and match["reduction"] not in REDUCTIONS:
            raise ConfigError(f"--metric {text!r}: reduction is one of {', '.join(REDUCTIONS)}")
        spec = cls(
            name,
            match["output"].strip() if match["output"] else None,
            match["reduction"],
            float(match["bound"]) if match["bound"] else None,
        )
        spec.resolve()  # fail now, not after an hour of search, on a bad module:function
        return spec

    @property
    def label(self) -> str:
        return f"{self.name}@{self.reduction or self.resolve().reduction}"

    def resolve(self) -> Builtin:
        if self.name in BUILTINS:
            return BUILTINS[self.name]
        module, _, attr = self.name.partition(":")
        try:
            function = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ConfigError(f"--metric {self.name}: cannot import it: {exc}") from exc
        if not callable(function):
            raise ConfigError(f"--metric {self.name}: {attr} is not a function")
        return Builtin(function, "mean")


@dataclass(frozen=True)
class Score:
    """One metric on one output: the candidate's value, FP32's own, and the bound it must keep."""

    output: str
    metric: str  # e.g. "pooled-cosine@min"
    value: float
    reference: float
    bound: float
    higher_is_better: bool
    decides: bool

    @property
    def key(self) -> str:
        return f"{self.output} {self.metric}"

    @property
    def ok(self) -> bool:
        tolerance = 1e-9
        if self.higher_is_better:
            return self.value >= self.bound - tolerance
        return self.value <= self.bound + tolerance

    @property
    def margin(self) -> float:
        return (self.value - self.bound) * (1 if self.higher_is_better else -1)


def mask_input(inputs: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The attention mask, when the model takes one: a 2-D integer/bool input named *mask*."""
    for name, value in inputs.items():
        if "mask" in name.lower() and value.ndim == 2 and value.dtype.kind in "biuf":
            return (value != 0).astype(np.float64)
    return None


def mask_for(value: np.ndarray, mask: np.ndarray | None) -> np.ndarray | None:
    if mask is None or value.ndim < 3 or value.shape[:2] != mask.shape:
        return None
    return mask


def _scores_like(name: str, value: np.ndarray) -> bool:
    """Class scores [rows, classes>1]; an embedding's argmax means nothing, so not those."""
    return value.ndim == 2 and value.shape[1] > 1 and "embed" not in name.lower()


def defaults(outputs: Outputs, mask: np.ndarray | None, labels: bool) -> list[MetricSpec]:
    """The metrics each output's shape calls for; the first of each output's list decides."""
    found: list[MetricSpec] = []
    labelled = False
    for name, value in outputs.items():
        if value.dtype.kind not in "fc":
            found.append(MetricSpec("equal", name))
            continue
        if mask_for(value, mask) is not None:
            # What consumers of a token sequence use is a pooled vector: judge that, and
            # report the masked per-row cosine beside it.
            found += [
                MetricSpec("pooled-cosine", name),
                MetricSpec("cosine", name, decides=False),
            ]
        elif _scores_like(name, value) and labels and not labelled:
            labelled = True
            found += [
                MetricSpec("accuracy", name),
                MetricSpec("top1", name, decides=False),
                MetricSpec("cosine", name, decides=False),
            ]
        elif _scores_like(name, value):
            found += [MetricSpec("top1", name), MetricSpec("cosine", name)]
        else:
            found.append(MetricSpec("cosine", name))
        found.append(MetricSpec("max-abs", name, decides=False))
    return found


def plan(
    specs: Sequence[MetricSpec], outputs: Outputs, mask: np.ndarray | None, labels: bool
) -> list[MetricSpec]:
    """The user's metrics (expanded over outputs), with the defaults beside them reported only.

    When the user names metrics, those alone decide: they said how the outputs are used.
    """
    auto = defaults(outputs, mask, labels)
    if not specs:
        return auto
    chosen: list[MetricSpec] = []
    for spec in specs:
        if spec.output is not None and spec.output not in outputs:
            raise ConfigError(
                f"--metric {spec.output}={spec.name}: the model has no output {spec.output!r};"
                f" it has {', '.join(outputs)}"
            )
        names = (
            [spec.output] if spec.output else [n for n, v in outputs.items() if v.dtype.kind == "f"]
        )
        chosen += [MetricSpec(spec.name, n, spec.reduction, spec.bound) for n in names]
    seen = {(s.output, s.name) for s in chosen}
    return chosen + [
        MetricSpec(s.name, s.output, s.reduction, s.bound, decides=False)
        for s in auto
        if (s.output, s.name) not in seen
    ]


def _value(spec: MetricSpec, ref: np.ndarray, out: np.ndarray, ctx: Context) -> float:
    metric = spec.resolve()
    raw = metric.function(ref, out, ctx)
    values = np.asarray(raw, dtype=np.float64)
    if values.ndim == 0:
        return float(values)
    return REDUCTIONS[spec.reduction or metric.reduction](values)


def evaluate(
    specs: Sequence[MetricSpec],
    reference: Outputs,
    outputs: Outputs,
    inputs: Mapping[str, np.ndarray],
    labels: np.ndarray | None,
    max_drop: float,
) -> list[Score]:
    """Every planned metric on every output it names; a metric that raises is a zero score."""
    mask = mask_input(inputs)
    scores = []
    for spec in specs:
        assert spec.output is not None
        ref, out = reference[spec.output], outputs.get(spec.output)
        ctx = Context(spec.output, inputs, labels, mask_for(ref, mask))
        metric = spec.resolve()
        own = _value(spec, ref, ref, ctx)
        if out is None or out.shape != ref.shape:
            value = -np.inf if metric.higher_is_better else np.inf
        else:
            value = _value(spec, ref, out, ctx)
        scores.append(
            Score(
                spec.output,
                spec.label,
                value,
                own,
                _bound(spec, metric, own, ref, max_drop),
                metric.higher_is_better,
                spec.decides,
            )
        )
    return scores


def _bound(spec: MetricSpec, metric: Builtin, own: float, ref: np.ndarray, drop: float) -> float:
    if spec.bound is not None:
        return spec.bound
    if metric.higher_is_better:
        return own - drop  # FP32 scores itself 1.0 on agreement, its accuracy on labels
    # max-abs: a drop-sized share of the output's range.
    return drop * float(np.max(np.abs(ref))) if ref.size else 0.0


def describe(specs: Sequence[MetricSpec]) -> str:
    deciding = sorted({f"{s.output} {s.label}" for s in specs if s.decides})
    return ", ".join(deciding)


def summary(scores: Sequence[Score]) -> dict[str, Any]:
    return {s.key: round(s.value, 6) for s in scores}
