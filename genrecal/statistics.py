"""Paired comparisons of two rows of a ``genrecal run`` over the same seeds.

Seed k of two rows shares the initial student, the data order and the data, so the per-seed
difference ``d_k = acc_a(k) - acc_b(k)`` removes what the seed does to both. The report gives
the mean of ``d`` with a two-sided 95% confidence interval from Student's t with ``n - 1``
degrees of freedom: ``mean(d) +- t_{0.975, n-1} * sd(d) / sqrt(n)``. A difference is called
significant when the interval excludes 0.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

#: Two-sided 95% quantiles t_{0.975, df} of Student's t for df = 1..30 (standard tables).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """t_{0.975, df}: the table for df <= 30, the normal quantile's Cornish-Fisher expansion
    beyond (error < 1e-3 there)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


@dataclass(frozen=True)
class Comparison:
    """Row ``a`` minus row ``b`` over ``n_seeds`` paired seeds (see the module docstring)."""

    a: str
    b: str
    mean_diff: float
    ci_low: float | None
    ci_high: float | None
    n_seeds: int

    @property
    def significant(self) -> bool:
        return self.ci_low is not None and (self.ci_low > 0 or self.ci_high < 0)

    def to_dict(self) -> dict:
        return asdict(self)

    def sentence(self) -> str:
        if self.ci_low is None:
            return f"{self.a} - {self.b}: {self.mean_diff:+.3f} (one seed: no interval)"
        verdict = ("significant: " + (f"{self.a} is better" if self.ci_low > 0 else f"{self.b} is better")
                   if self.significant else "not significant (the interval contains 0)")
        return (f"{self.a} - {self.b}: {self.mean_diff:+.3f}, 95% CI [{self.ci_low:+.3f}, "
                f"{self.ci_high:+.3f}] over {self.n_seeds} seeds; {verdict}")


def paired_comparison(a: str, b: str, values_a: Sequence[float], values_b: Sequence[float]) -> Comparison:
    """The paired comparison of ``a`` and ``b`` from their per-seed values (same seed order)."""
    if len(values_a) != len(values_b) or not values_a:
        raise ValueError(f"{a} and {b} need the same non-empty list of seeds; got "
                         f"{len(values_a)} and {len(values_b)} values")
    diffs = [float(x) - float(y) for x, y in zip(values_a, values_b)]
    mean, n = statistics.fmean(diffs), len(diffs)
    if n == 1:
        return Comparison(a, b, mean, None, None, 1)
    half = t975(n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return Comparison(a, b, mean, mean - half, mean + half, n)
