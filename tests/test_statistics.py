"""Paired 95% confidence intervals of row differences (genrecal.statistics)."""

from __future__ import annotations

import math

import pytest

from genrecal.statistics import paired_comparison, t975


def test_interval_against_a_hand_computed_example():
    diffs = (0.02, 0.04, 0.03, 0.05, 0.03)  # mean 0.034
    c = paired_comparison("GenRecal", "SFT", [0.5 + d for d in diffs], [0.50] * 5)
    sd = math.sqrt(sum((d - 0.034) ** 2 for d in diffs) / 4)  # sample std, ddof 1
    half = 2.776 * sd / math.sqrt(5)  # t_{0.975, 4} from the table
    assert c.mean_diff == pytest.approx(0.034) and c.n_seeds == 5
    assert (c.ci_low, c.ci_high) == pytest.approx((0.034 - half, 0.034 + half))
    assert c.significant and "GenRecal is better" in c.sentence()


def test_an_interval_containing_zero_is_not_significant_and_one_seed_has_none():
    c = paired_comparison("a", "b", [0.5, 0.4, 0.6], [0.45, 0.5, 0.5])
    assert c.ci_low < 0 < c.ci_high and not c.significant and "not significant" in c.sentence()
    single = paired_comparison("a", "b", [0.5], [0.4])
    assert single.ci_low is None and not single.significant


def test_t_quantiles_and_bad_input():
    assert t975(1) == 12.706 and t975(30) == 2.042
    assert t975(60) == pytest.approx(2.000, abs=1e-3) and t975(1000) == pytest.approx(1.962, abs=1e-3)
    with pytest.raises(ValueError):
        t975(0)
    with pytest.raises(ValueError, match="same non-empty"):
        paired_comparison("a", "b", [0.1, 0.2], [0.1])
