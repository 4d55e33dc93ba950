"""The study's verdict rule: the mean paired difference over seeds with a 95 % t-interval.

Every comparison pairs the two configs by seed (a seed fixes the data split, the batch order and
the initial weights, so both configs of one seed share them). With ``d_i = a_i - b_i`` over the
``n`` seeds both configs ran,

    mean  d = (1/n) sum_i d_i,     s^2 = (1/(n-1)) sum_i (d_i - d)^2,
    interval = d -/+ t_{0.975, n-1} s / sqrt(n)

(Student's t over seeds, two-sided 95 %). The verdicts:

- ``reproduced``: the interval lies entirely on the side the claim names (``a > b`` or ``a < b``);
  for an equivalence claim, entirely inside ``(-margin, margin)`` with the margin stated in the code
  before the runs;
- ``not reproduced``: the interval lies entirely on the other side (for equivalence: entirely
  outside the margin);
- ``inconclusive``: otherwise, and always with fewer than :data:`MIN_SEEDS` seeds.

The same formula gives the interval of a speed ratio over benchmark rounds (:func:`t_interval`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

#: the fewest seeds a comparison needs before any verdict but "inconclusive"
MIN_SEEDS = 5
#: two-sided confidence of every interval
CONFIDENCE = 0.95

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
Claim = Literal["greater", "less", "equivalent"]

# t_{0.975, df} for df = 1..30 (two-sided 95 %); beyond 30 the Cornish-Fisher expansion below
# is within 1e-4 of the exact quantile
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip


def t_quantile(df: int) -> float:
    """``t_{0.975, df}``: the two-sided 95 % quantile of Student's t with ``df`` degrees of freedom.

    Raises:
        ValueError: ``df < 1``.
    """
    if df < 1:
        raise ValueError(f"a t-interval needs at least 2 values (df >= 1), got df={df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = statistics.NormalDist().inv_cdf(0.975)
    v = float(df)
    return (
        z
        + (z**3 + z) / (4 * v)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
    )


def t_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of ``values`` and its 95 % t-interval.

    With one value the interval is unbounded (``-inf, inf``): nothing is known about the spread.
    """
    if not values:
        raise ValueError("t_interval needs at least one value")
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, -math.inf, math.inf
    half = t_quantile(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return m, m - half, m + half


def ratio_block(ratios: Sequence[float]) -> dict[str, object]:
    """A benchmark ratio over rounds as the result files store it: ``mean``, ``low`` and
    ``high`` (:func:`t_interval`), the ``median`` and the per-round ``ratios``."""
    m, low, high = t_interval(ratios)
    return {
        "mean": m,
        "low": low,
        "high": high,
        "median": statistics.median(ratios),
        "ratios": list(ratios),
    }


@dataclass(frozen=True)
class Verdict:
    """One paired comparison.

    Attributes:
        n: seeds both configs ran.
        mean: mean paired difference ``a - b``.
        low, high: its 95 % t-interval.
        verdict: ``reproduced``, ``not reproduced`` or ``inconclusive``.
        reason: why, in numbers (the margin, or the seed count below :data:`MIN_SEEDS`).
    """

    n: int
    mean: float
    low: float
    high: float
    verdict: str
    reason: str

    @property
    def label(self) -> str:
        """The verdict as the page prints it, with the seed count when that decided it."""
        if self.n < MIN_SEEDS:
            return f"{INCONCLUSIVE} ({self.n} seeds < {MIN_SEEDS})"
        return self.verdict


def paired_verdict(
    a: Mapping[int, float],
    b: Mapping[int, float],
    claim: Claim,
    margin: float | None = None,
) -> Verdict:
    """The verdict on "``a`` is greater / less than / equivalent to ``b``" from paired seeds.

    Args:
        a, b: ``{seed: value}`` of the two configs; only seeds in both are used.
        claim: ``"greater"`` (``a > b``), ``"less"`` (``a < b``) or ``"equivalent"``
            (``|a - b| < margin``).
        margin: the equivalence margin (> 0), required for ``"equivalent"`` and only there.

    Returns:
        The :class:`Verdict` (see the module docstring for the rule).

    Raises:
        ValueError: an unknown claim, or a margin missing / given where it does not belong.
    """
    if claim not in ("greater", "less", "equivalent"):
        raise ValueError(f"claim must be 'greater', 'less' or 'equivalent', not {claim!r}")
    if (claim == "equivalent") != (margin is not None):
        raise ValueError("give a margin for an 'equivalent' claim, and only for it")
    if margin is not None and margin <= 0:
        raise ValueError(f"the equivalence margin must be positive, got {margin}")
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    if not diffs:
        return Verdict(0, math.nan, math.nan, math.nan, INCONCLUSIVE, "no seed ran both configs")
    mean, low, high = t_interval(diffs)
    n = len(diffs)
    if n < MIN_SEEDS:
        return Verdict(n, mean, low, high, INCONCLUSIVE, f"{n} seeds < {MIN_SEEDS}")
    if claim == "equivalent":
        assert margin is not None
        if -margin < low and high < margin:
            return Verdict(n, mean, low, high, REPRODUCED, f"inside the margin +/-{margin:g}")
        if low >= margin or high <= -margin:
            return Verdict(n, mean, low, high, NOT_REPRODUCED, f"outside the margin +/-{margin:g}")
        return Verdict(n, mean, low, high, INCONCLUSIVE, f"crosses the margin +/-{margin:g}")
    sign = 1.0 if claim == "greater" else -1.0
    lo, hi = sorted((sign * low, sign * high))
    if lo > 0:
        return Verdict(
            n, mean, low, high, REPRODUCED, "the interval excludes 0 on the claimed side"
        )
    if hi < 0:
        return Verdict(
            n, mean, low, high, NOT_REPRODUCED, "the interval excludes 0 on the other side"
        )
    return Verdict(n, mean, low, high, INCONCLUSIVE, "the interval contains 0")
