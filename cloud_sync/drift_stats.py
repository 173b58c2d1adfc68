"""The figures a drift verdict is made of, from a baseline's bin counts and a window's.

* PSI (population stability index) and the Jensen-Shannon divergence (bits, 0-1) of the two
  bin distributions, each bin floored at ``EPS`` so an empty bin is not infinite;
* a KS distance: the largest gap between the two cumulative distributions at the bin edges.
  The edges are the baseline's quantiles, so the bins are a quantile sketch of the feature and
  this is the two-sample KS statistic read at those quantiles (a lower bound of the exact one,
  short of it by at most one bin's mass);
* a p-value: the chi-square test of homogeneity of the two count vectors (the baseline is a
  sample too, so its size counts), bins below and above the baseline's range folded into the
  first and last bins (the baseline has none there by construction);
* Benjamini-Hochberg over the features of one cohort and window, for many features;
* ``Tally``: the counts of devices that bin samples of their rows at different rates, pooled
  so that each device weighs what it served.

Pure numpy and math: no scipy on the cloud's sync process either.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

EPS = 1e-4


def _shares(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(axis=-1, keepdims=True)
    shares = counts / np.maximum(total, 1.0)
    shares = np.maximum(shares, EPS)
    return np.asarray(shares / shares.sum(axis=-1, keepdims=True))


def psi(base: np.ndarray, current: np.ndarray) -> float:
    p, q = _shares(base), _shares(current)
    return float(((q - p) * np.log(q / p)).sum())


def jensen_shannon(base: np.ndarray, current: np.ndarray) -> float:
    p, q = _shares(base), _shares(current)
    m = (p + q) / 2
    return float(0.5 * (p * np.log2(p / m)).sum() + 0.5 * (q * np.log2(q / m)).sum())


def ks_distance(base: np.ndarray, current: np.ndarray) -> float:
    base, current = np.asarray(base, np.float64), np.asarray(current, np.float64)
    if base.sum() <= 0 or current.sum() <= 0:
        return 0.0
    gap = np.cumsum(base) / base.sum() - np.cumsum(current) / current.sum()
    return float(np.abs(gap).max())


def fold_tails(counts: np.ndarray) -> np.ndarray:
    """Below-range counts into the first bin, above-range into the last (axis -1)."""
    counts = np.asarray(counts, dtype=np.float64)
    inner = counts[..., 1:-1].copy()
    inner[..., 0] += counts[..., 0]
    inner[..., -1] += counts[..., -1]
    return inner


def chi2_statistic(base: np.ndarray, current: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Chi-square of homogeneity of two count vectors (rows over the last axis, broadcast) and
    its degrees of freedom (bins either side has counts in, minus one)."""
    a, b = np.asarray(base, np.float64), np.asarray(current, np.float64)
    a, b = np.broadcast_arrays(a, b)
    na, nb = a.sum(axis=-1, keepdims=True), b.sum(axis=-1, keepdims=True)
    total = a + b
    used = total > 0
    expected_a = np.where(used, total * na / np.maximum(na + nb, 1), 1.0)
    expected_b = np.where(used, total * nb / np.maximum(na + nb, 1), 1.0)
    stat = np.where(
        used, (a - expected_a) ** 2 / expected_a + (b - expected_b) ** 2 / expected_b, 0
    )
    return stat.sum(axis=-1), np.maximum(used.sum(axis=-1) - 1, 1)


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for X ~ chi-square(df): the regularized upper incomplete gamma Q(df/2, x/2)."""
    if x <= 0:
        return 1.0
    return _gamma_q(df / 2.0, x / 2.0)


def _gamma_q(a: float, x: float) -> float:
    """Q(a, x) by the series (x < a + 1) or Lentz's continued fraction (Numerical Recipes 6.2)."""
    log_front = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1:
        term = total = 1.0 / a
        ap = a
        for _ in range(500):
            ap += 1
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(log_front))
    tiny = 1e-300
    b = x + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 500):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return min(1.0, math.exp(log_front) * h)


def p_value(base: np.ndarray, current: np.ndarray) -> float:
    stat, df = chi2_statistic(fold_tails(base), fold_tails(current))
    return chi2_sf(float(stat), int(df))


def benjamini_hochberg(p_values: Sequence[float], alpha: float) -> list[float]:
    """Each p-value's BH critical value if it is rejected at false-discovery rate ``alpha``,
    else 0.0 (not rejected)."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    cut = 0
    for rank, i in enumerate(order, start=1):
        if p_values[i] <= alpha * rank / m:
            cut = rank
    thresholds = [0.0] * m
    for i in order[:cut]:
        thresholds[i] = alpha * cut / m
    return thresholds


@dataclass(frozen=True)
class Tally:
    """A feature's bin counts pooled over summaries that each binned a sample of the rows their
    device served (``cloud_sync.drift_summary``: ``binned`` of ``rows``).

    Adding the binned counts as they are would weigh each device by the rows it binned, not by
    the rows it served: a device binning 1 request in 50 would count for a fiftieth of its
    traffic, and a cohort's shares would lean towards the devices that binned everything. So
    each summary's counts are weighted by ``rows / binned`` (``weighted``: an estimate of the
    counts of every row served, the shares of the pool the device's shares weighted by its rows),
    and the squares of those weights are summed over the binned rows (``squares``). ``counts``
    are the pooled shares times Kish's effective sample size, ``weighted.sum() ** 2 / squares``:
    what the chi-square test, PSI, JS and KS take. When every summary binned at one rate (every
    row, above all) they are exactly the binned counts added up, as before; at mixed rates the
    effective size is below the rows binned, as it should be (``test_drift_sampled_merge``).
    Tallies add and subtract (a device left out), so the leave-one-out tests stay exact."""

    weighted: np.ndarray
    squares: float = 0.0

    @classmethod
    def of(cls, counts: Sequence[float] | np.ndarray, rows: float, binned: float) -> Tally:
        c = np.asarray(counts, dtype=np.float64)
        weight = rows / binned if binned > 0 and rows > binned else 1.0
        return cls(c * weight if weight != 1.0 else c, float(c.sum()) * weight * weight)

    def __add__(self, other: Tally) -> Tally:
        return Tally(self.weighted + other.weighted, self.squares + other.squares)

    def __sub__(self, other: Tally) -> Tally:
        return Tally(self.weighted - other.weighted, self.squares - other.squares)

    def scaled(self, factor: float) -> Tally:
        """Every count times ``factor``: a device's weight cut to what it can have served."""
        return Tally(self.weighted * factor, self.squares * factor)

    def counts(self) -> np.ndarray:
        total = float(self.weighted.sum())
        if total <= 0 or self.squares <= 0:
            return np.zeros_like(self.weighted)
        return np.asarray(self.weighted * (total / self.squares))


def pooled(tallies: Sequence[Tally]) -> Tally:
    out = tallies[0]
    for t in tallies[1:]:
        out = out + t
    return out
