"""Means with 95 % confidence intervals over seeds, and verdicts that only count when the interval says so.

A figure of a few seeds is reported as mean ± half-width of the two-sided Student t-interval:
half = t(0.975, n - 1) * s / sqrt(n), with s the sample standard deviation. One seed has no interval.

A ratio of two figures measured on the same seeds (a method's drop over the plain one's) is the ratio of their
means with Fieller's interval (`fieller`): it keeps every seed, whatever the sign of a seed's denominator, and
it is unbounded, and says so, when the denominator's mean is not resolved from zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

from scipy import stats


@dataclass(frozen=True)
class Estimate:
    """A figure over seeds: mean, half-width of its 95 % interval (nan for one seed) and the number of seeds."""

    mean: float
    half: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half

    def text(self, scale: float = 1.0, digits: int = 2) -> str:
        """'53.40 ± 1.21' (or '53.40' for one seed), in units of `scale` (100 for percent)."""
        if math.isnan(self.mean):
            return "–"
        mean = f"{scale * self.mean:.{digits}f}"
        return mean if self.n < 2 else f"{mean} ± {scale * self.half:.{digits}f}"


def t_quantile(n: int, level: float = 0.95) -> float:
    """The two-sided Student t quantile for n values (n - 1 degrees of freedom)."""
    return float(stats.t.ppf(0.5 + level / 2, n - 1))


def estimate(values: Iterable[float], level: float = 0.95) -> Estimate:
    """Mean and t-interval of the finite values given (one per seed)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(xs)
    if n == 0:
        return Estimate(float("nan"), float("nan"), 0)
    mean = sum(xs) / n
    if n == 1:
        return Estimate(mean, float("nan"), 1)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return Estimate(mean, t_quantile(n, level) * sd / math.sqrt(n), n)


@dataclass(frozen=True)
class Ratio:
    """mean(a) / mean(b) over paired seeds, with its 95 % Fieller interval [low, high]: (-inf, inf) where the
    denominator's mean is not resolved from zero (the true set is then unbounded); nan for fewer than two seeds."""

    value: float
    low: float
    high: float
    n: int

    def text(self, digits: int = 2) -> str:
        """'0.74 [0.41, 1.20]', '0.74 [unbounded]', '0.74' (one seed) or '–' (the denominator's mean is <= 0)."""
        if math.isnan(self.value):
            return "– (the denominator's mean is not above 0)"
        value = f"{self.value:.{digits}f}"
        if math.isnan(self.low):
            return value
        if math.isinf(self.low) or math.isinf(self.high):
            return f"{value} [unbounded: the denominator is not resolved from 0]"
        return f"{value} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def fieller(a: Iterable[float], b: Iterable[float], level: float = 0.95) -> Ratio:
    """Fieller's interval for mean(a) / mean(b), a and b paired (one pair per seed; pairs with a missing value are
    left out): the ratios r with (mean a - r mean b)^2 <= t^2 var(mean a - r mean b), t the Student quantile for
    n - 1 degrees of freedom and the variances and covariance those of the means."""
    pairs = [(float(x), float(y)) for x, y in zip(a, b) if math.isfinite(float(x)) and math.isfinite(float(y))]
    n = len(pairs)
    if n == 0:
        return Ratio(math.nan, math.nan, math.nan, 0)
    ma, mb = (sum(p[i] for p in pairs) / n for i in (0, 1))
    value = ma / mb if mb > 0 else math.nan
    if n < 2:
        return Ratio(value, math.nan, math.nan, n)
    cov = lambda i, j: sum((p[i] - (ma, mb)[i]) * (p[j] - (ma, mb)[j]) for p in pairs) / (n - 1) / n  # noqa: E731
    t2 = t_quantile(n, level) ** 2
    qa, qb, qc = mb ** 2 - t2 * cov(1, 1), ma * mb - t2 * cov(0, 1), ma ** 2 - t2 * cov(0, 0)
    if qa <= 0:  # the denominator's interval holds 0: the set of ratios is unbounded
        return Ratio(value, -math.inf, math.inf, n)
    root = math.sqrt(max(qb ** 2 - qa * qc, 0.0))
    return Ratio(value, (qb - root) / qa, (qb + root) / qa, n)


def verdict(e: Estimate | Ratio, target: float, at_least: bool = True) -> str:
    """'met' when the whole interval is on the right side of the target, 'missed' when it is wholly on the wrong
    side, 'not resolved' when it straddles it (or when one seed gives no interval, or the interval is unbounded)."""
    if e.n == 0 or math.isnan(getattr(e, "value", getattr(e, "mean", math.nan))):
        return "not resolved (no value: a ratio's denominator was zero)"
    if e.n < 2 or math.isnan(e.low):
        return "not resolved (one seed)"
    if math.isinf(e.low) and math.isinf(e.high):
        return "not resolved (unbounded interval: the denominator is not resolved from zero)"
    low, high = (e.low, e.high) if at_least else (-e.high, -e.low)
    goal = target if at_least else -target
    if low >= goal:
        return "met"
    if high < goal:
        return "missed"
    return "not resolved (the interval contains the target)"
