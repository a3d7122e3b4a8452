"""Means with 95 % confidence intervals over seeds, and verdicts that only count when the interval says so.

A figure of a few seeds is reported as mean ± half-width of the two-sided Student t-interval:
half = t(0.975, n - 1) * s / sqrt(n), with s the sample standard deviation. One seed has no interval.
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


def verdict(e: Estimate, target: float, at_least: bool = True) -> str:
    """'met' when the whole interval is on the right side of the target, 'missed' when it is wholly on the wrong
    side, 'not resolved' when it straddles it (or when one seed gives no interval)."""
    if e.n == 0:
        return "not resolved (no value: a ratio's denominator was zero)"
    if e.n < 2 or math.isnan(e.half):
        return "not resolved (one seed)"
    low, high = (e.low, e.high) if at_least else (-e.high, -e.low)
    goal = target if at_least else -target
    if low >= goal:
        return "met"
    if high < goal:
        return "missed"
    return "not resolved (the interval contains the target)"
