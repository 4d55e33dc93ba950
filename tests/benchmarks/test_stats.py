"""The study's verdict rule: known paired differences give known intervals and verdicts."""

from __future__ import annotations

import math

import pytest

from benchmarks.stats import (
    INCONCLUSIVE,
    MIN_SEEDS,
    NOT_REPRODUCED,
    REPRODUCED,
    paired_verdict,
    t_interval,
    t_quantile,
)


def _pair(diffs: list[float], base: float = 0.5) -> tuple[dict[int, float], dict[int, float]]:
    """``a - b = diffs`` seed by seed, on a base value that differs per seed (the pairing must
    remove it)."""
    b = {s: base + 0.1 * s for s in range(len(diffs))}
    return {s: b[s] + d for s, d in enumerate(diffs)}, b


def test_t_quantile_matches_known_values():
    assert t_quantile(1) == pytest.approx(12.7062, abs=1e-4)
    assert t_quantile(4) == pytest.approx(2.7764, abs=1e-4)
    assert t_quantile(30) == pytest.approx(2.0423, abs=1e-4)
    # past the table, the expansion: t(0.975, 40) = 2.0211, t(0.975, 120) = 1.9799
    assert t_quantile(40) == pytest.approx(2.0211, abs=2e-4)
    assert t_quantile(120) == pytest.approx(1.9799, abs=2e-4)
    with pytest.raises(ValueError, match="df >= 1"):
        t_quantile(0)


def test_t_quantile_agrees_with_scipy_where_available():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 9, 17, 29, 31, 45, 80, 200):
        assert t_quantile(df) == pytest.approx(stats.t.ppf(0.975, df), abs=2e-4)


def test_t_interval_by_hand():
    # diffs 1.0, 1.2, 0.8, 1.1, 0.9: mean 1, s = sqrt(0.1 / 4), half = t(4) s / sqrt(5)
    m, low, high = t_interval([1.0, 1.2, 0.8, 1.1, 0.9])
    half = 2.7764 * math.sqrt(0.1 / 4) / math.sqrt(5)
    assert m == pytest.approx(1.0, abs=1e-12)
    assert (low, high) == (pytest.approx(1 - half, abs=1e-4), pytest.approx(1 + half, abs=1e-4))
    assert t_interval([3.0]) == (3.0, -math.inf, math.inf)


def test_greater_claim_reproduced_and_its_mirror_not_reproduced():
    a, b = _pair([1.0, 1.2, 0.8, 1.1, 0.9])
    v = paired_verdict(a, b, "greater")
    half = 2.7764 * math.sqrt(0.1 / 4) / math.sqrt(5)
    assert v.n == 5 and v.mean == pytest.approx(1.0, abs=1e-9)
    assert v.low == pytest.approx(1 - half, abs=1e-4)
    assert v.high == pytest.approx(1 + half, abs=1e-4)
    assert v.verdict == REPRODUCED and v.label == REPRODUCED
    assert paired_verdict(a, b, "less").verdict == NOT_REPRODUCED
    assert paired_verdict(b, a, "less").verdict == REPRODUCED


def test_interval_containing_zero_is_inconclusive():
    a, b = _pair([1.0, -1.0, 0.5, -0.5, 0.0])
    for claim in ("greater", "less"):
        v = paired_verdict(a, b, claim)
        assert v.verdict == INCONCLUSIVE
        assert v.low < 0 < v.high


def test_pairing_removes_what_seeds_share():
    # unpaired, the per-seed base (0.5 .. 0.9) swamps a 0.01 difference; paired it is exact
    a, b = _pair([0.01, 0.011, 0.009, 0.0105, 0.0095])
    assert min(a.values()) < max(b.values())
    assert paired_verdict(a, b, "greater").verdict == REPRODUCED


def test_fewer_than_min_seeds_is_always_inconclusive():
    a, b = _pair([5.0, 5.1, 4.9, 5.05])  # a huge, steady effect on 4 seeds
    v = paired_verdict(a, b, "greater")
    assert v.verdict == INCONCLUSIVE
    assert v.label == f"inconclusive ({MIN_SEEDS - 1} seeds < {MIN_SEEDS})"
    assert v.low > 0  # the interval is still computed and shown


def test_only_seeds_both_ran_count():
    a, b = _pair([1.0, 1.2, 0.8, 1.1, 0.9])
    b[7] = 100.0  # a seed only b ran
    a[8] = -100.0  # and one only a ran
    v = paired_verdict(a, b, "greater")
    assert v.n == 5 and v.mean == pytest.approx(1.0, abs=1e-9)
    empty = paired_verdict({0: 1.0}, {1: 1.0}, "greater")
    assert empty.n == 0 and empty.verdict == INCONCLUSIVE


def test_equivalence_inside_outside_and_across_the_margin():
    inside = _pair([0.001, -0.002, 0.0, 0.002, -0.001])
    assert paired_verdict(*inside, "equivalent", margin=0.01).verdict == REPRODUCED
    outside = _pair([0.05, 0.051, 0.049, 0.0505, 0.0495])
    assert paired_verdict(*outside, "equivalent", margin=0.01).verdict == NOT_REPRODUCED
    below = _pair([-0.05, -0.051, -0.049, -0.0505, -0.0495])
    assert paired_verdict(*below, "equivalent", margin=0.01).verdict == NOT_REPRODUCED
    across = _pair([0.0, 0.02, -0.01, 0.015, 0.005])
    v = paired_verdict(*across, "equivalent", margin=0.01)
    assert v.verdict == INCONCLUSIVE and v.low < 0.01 < v.high


def test_bad_arguments_are_refused():
    a, b = _pair([1.0] * 5)
    with pytest.raises(ValueError, match="claim must be"):
        paired_verdict(a, b, "bigger")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="margin"):
        paired_verdict(a, b, "equivalent")
    with pytest.raises(ValueError, match="margin"):
        paired_verdict(a, b, "greater", margin=0.1)
    with pytest.raises(ValueError, match="positive"):
        paired_verdict(a, b, "equivalent", margin=0.0)
