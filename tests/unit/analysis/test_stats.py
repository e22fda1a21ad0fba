"""harness.analysis.stats on fixed data with known (hand-checkable) answers."""

from __future__ import annotations

import math
from math import comb

import numpy as np
import pytest

from harness.analysis import stats


# --- Poisson rates -------------------------------------------------------------------------------

def test_poisson_interval_known_values():
    assert stats.poisson_interval(0) == pytest.approx((0.0, 3.6889), abs=1e-4)
    low, high = stats.poisson_interval(10)
    assert low == pytest.approx(4.7954, abs=1e-4)
    assert high == pytest.approx(18.3904, abs=1e-4)
    # Garwood at 90%: 1 event -> [0.0513, 4.7439] (standard tables)
    assert stats.poisson_interval(1, 0.90) == pytest.approx((0.05129, 4.74386), abs=1e-4)


def test_zero_events_is_a_bound_not_zero_percent():
    rate = stats.poisson_rate(0, exposure=2.0)
    assert rate.rate == 0.0 and rate.low == 0.0
    assert rate.high == pytest.approx(3.6889 / 2, abs=1e-4)             # two-sided 95% upper end
    assert rate.upper_bound == pytest.approx(-math.log(0.05) / 2, rel=1e-9)  # exact one-sided 95%: 2.996 / 2
    assert rate.rule_of_three == pytest.approx(1.5)
    assert stats.poisson_upper_bound(0) == pytest.approx(2.9957, abs=1e-4)
    nonzero = stats.poisson_rate(10, exposure=4.0)
    assert nonzero.rate == 2.5 and nonzero.upper_bound is None and nonzero.rule_of_three is None
    assert (nonzero.low, nonzero.high) == pytest.approx((4.7954 / 4, 18.3904 / 4), abs=1e-4)
    assert math.isnan(stats.poisson_rate(3, exposure=0).rate)


def test_zero_of_n_trials_rule_of_three_and_exact():
    bound = stats.zero_of_n_bound(10)
    assert bound.rule_of_three == pytest.approx(0.3)
    assert bound.upper_bound == pytest.approx(1 - 0.05 ** (1 / 10), rel=1e-9)  # 0.2589
    assert stats.zero_of_n_bound(30).upper_bound == pytest.approx(0.0950, abs=1e-4)


# --- rate ratio ----------------------------------------------------------------------------------

def _binomial_two_sided_equal(k: int, n: int) -> float:
    """Two-sided exact binomial p for p0 = 1/2 (symmetric: twice the smaller tail)."""
    tail = sum(comb(n, j) for j in range(max(k, n - k), n + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def test_rate_ratio_equal_exposure_known_answer():
    result = stats.rate_ratio(20, 1.0, 5, 1.0)
    assert result.ratio == pytest.approx(4.0)
    assert result.p_value == pytest.approx(_binomial_two_sided_equal(20, 25), rel=1e-9)  # 0.00408
    # Clopper-Pearson for 20/25 is [0.5930, 0.9317] -> odds [1.457, 13.64]
    assert result.low == pytest.approx(1.4568, abs=1e-3)
    assert result.high == pytest.approx(13.639, abs=1e-2)
    assert result.low < result.ratio < result.high


def test_rate_ratio_uses_exposure():
    # Same rates (2/h vs 2/h) with 3x the exposure on one side: no difference.
    same = stats.rate_ratio(12, 6.0, 4, 2.0)
    assert same.ratio == pytest.approx(1.0)
    assert same.p_value == pytest.approx(1.0)
    assert same.low < 1 < same.high
    swapped = stats.rate_ratio(4, 2.0, 12, 6.0)
    assert (swapped.low, swapped.high) == pytest.approx((1 / same.high, 1 / same.low), rel=1e-6)


def test_rate_ratio_edges():
    none = stats.rate_ratio(0, 1.0, 0, 1.0)
    assert math.isnan(none.ratio) and none.p_value == 1.0 and none.high == math.inf and none.detectable == math.inf
    only_variant = stats.rate_ratio(3, 1.0, 0, 1.0)
    assert only_variant.ratio == math.inf and only_variant.high == math.inf
    assert only_variant.p_value == pytest.approx(0.25)
    assert only_variant.detectable == math.inf      # 3 crashes in all: no split is significant
    # 10 vs 10: a 2x split is not visible, the detectable ratio is where the binomial test starts to reject
    even = stats.rate_ratio(10, 1.0, 10, 1.0)
    k = next(k for k in range(10, 21) if _binomial_two_sided_equal(k, 20) < 0.05)   # 15
    assert even.detectable == pytest.approx(k / (20 - k))
    with pytest.raises(ValueError):
        stats.rate_ratio(1, 0.0, 1, 1.0)


# --- Fisher --------------------------------------------------------------------------------------

def _fisher_two_sided(a: int, b: int, c: int, d: int) -> float:
    """Hypergeometric by hand: sum of tables at most as likely as the observed one."""
    row1, col1, n = a + b, a + c, a + b + c + d

    def prob(x: int) -> float:
        return comb(col1, x) * comb(n - col1, row1 - x) / comb(n, row1)

    observed = prob(a)
    return sum(prob(x) for x in range(max(0, row1 + col1 - n), min(row1, col1) + 1)
               if prob(x) <= observed * (1 + 1e-7))


def test_fisher_hand_checked_table():
    result = stats.fisher_trials(8, 10, 1, 10)
    assert result.p_value == pytest.approx(0.005477, abs=1e-6)
    assert result.p_value == pytest.approx(_fisher_two_sided(8, 2, 1, 9), rel=1e-9)
    assert result.low < result.odds_ratio < result.high
    assert result.low == pytest.approx(2.058, abs=1e-3)   # exact conditional interval
    # With the baseline at 1/10, 7/10 would show (p=0.0198) but 6/10 would not (p=0.057).
    assert _fisher_two_sided(7, 3, 1, 9) < 0.05 < _fisher_two_sided(6, 4, 1, 9)
    assert result.detectable_high == 7 and result.detectable_low is None


def test_fisher_degenerate_tables():
    none = stats.fisher_trials(0, 5, 0, 5)
    assert none.p_value == 1.0 and math.isnan(none.odds_ratio)
    assert none.detectable_high == 4          # 4/5 vs 0/5: p = 0.048
    assert _fisher_two_sided(4, 1, 0, 5) < 0.05 < _fisher_two_sided(3, 2, 0, 5)
    all_crashed = stats.fisher_trials(5, 5, 5, 5)
    assert all_crashed.p_value == 1.0 and all_crashed.detectable_low == 1


# --- time to first crash -------------------------------------------------------------------------

def test_first_crash_summary_counts_censored_trials():
    summary = stats.first_crash_summary([3.0, None, 5.0], [10.0, 10.0, 10.0])
    assert (summary.trials, summary.crashed, summary.censored) == (3, 2, 1)
    assert summary.median == 5.0            # Kaplan-Meier: S(3)=2/3, S(5)=1/3
    assert summary.censored_at == 10.0 and summary.earliest == 3.0
    mostly_fine = stats.first_crash_summary([4.0, None, None], [10.0, 10.0, 10.0])
    assert mostly_fine.median is None       # fewer than half crashed: no median, not "4s"
    nothing = stats.first_crash_summary([None, None], [10.0, 12.0])
    assert nothing.crashed == 0 and nothing.median is None and nothing.censored_at == 10.0


def test_first_crash_logrank_direction():
    sooner = stats.first_crash_test([1, 2, 3, 4], [10] * 4, [8, None, None, None], [10] * 4)
    assert sooner.statistic > 0 and sooner.p_value < 0.05
    assert sooner.time_ratio is not None and math.isnan(sooner.time_ratio)  # baseline median undefined
    nothing = stats.first_crash_test([None], [10], [None], [10])
    assert math.isnan(nothing.p_value) and nothing.detectable == math.inf


# --- per-trial samples: Mann-Whitney + bootstrap -------------------------------------------------

def test_mann_whitney_known_samples():
    separated = stats.compare_samples([1, 2, 3, 4, 5], [6, 7, 8, 9, 10])
    assert separated.p_value == pytest.approx(2 / comb(10, 5))   # 0.00794: complete separation
    assert separated.direction == -1 and separated.min_p == pytest.approx(2 / 252)
    assert separated.ratio == pytest.approx(3 / 8)
    # U = 3 of 9 pairs; P(U <= 3) = 7/20 by enumeration of the 20 arrangements -> two-sided 0.7
    interleaved = stats.compare_samples([1, 3, 5], [2, 4, 6])
    assert interleaved.p_value == pytest.approx(0.7)
    assert interleaved.direction == -1
    # 3 vs 3 trials can never reach 0.05: nothing is detectable
    assert interleaved.min_p == pytest.approx(0.1) and interleaved.detectable == math.inf


def test_min_rank_p():
    assert stats.min_rank_p(3, 3) == pytest.approx(0.1)
    assert stats.min_rank_p(5, 5) == pytest.approx(0.0079365, rel=1e-4)
    assert stats.min_rank_p(6, 6) == pytest.approx(2 / 924)
    assert stats.min_rank_p(0, 4) == 1.0


def test_bootstrap_is_deterministic_for_a_seed():
    x, y = [1.1, 1.3, 1.2, 1.5, 1.25, 1.4], [1.0, 0.9, 1.05, 1.1, 0.95, 1.0]
    first = stats.bootstrap_ratio_of_medians(x, y, seed=42, n_resamples=2000)
    again = stats.bootstrap_ratio_of_medians(x, y, seed=42, n_resamples=2000)
    other = stats.bootstrap_ratio_of_medians(x, y, seed=43, n_resamples=2000)
    assert first == again
    assert first != other
    assert first[2] == "BCa" and first[0] < np.median(x) / np.median(y) < first[1]
    assert stats.compare_samples(x, y, seed=[1, 2]) == stats.compare_samples(x, y, seed=[1, 2])


def test_bootstrap_degenerate_and_impossible():
    assert stats.bootstrap_ratio_of_medians([2.0, 2.0, 2.0], [1.0, 1.0, 1.0], n_resamples=500)[:2] == (2.0, 2.0)
    low, high, method = stats.bootstrap_ratio_of_medians([1.0], [1.0, 2.0])
    assert math.isnan(low) and method == "none"
    assert stats.bootstrap_ratio_of_medians([1.0, 2.0], [0.0, 1.0])[2] == "none"


def test_bootstrap_coverage_simple_case():
    """Lognormal samples with a known ratio of medians (2/3): the 95% interval covers it most of the time."""
    rng = np.random.default_rng(2024)
    true_ratio = 1 / 1.5
    reps, covered = 150, 0
    for i in range(reps):
        x = rng.lognormal(0.0, 0.5, 20)
        y = rng.lognormal(math.log(1.5), 0.5, 20)
        low, high, _ = stats.bootstrap_ratio_of_medians(x, y, seed=i, n_resamples=999)
        covered += low <= true_ratio <= high
    coverage = covered / reps
    print(f"bootstrap coverage {coverage:.3f} over {reps} samples")
    assert 0.85 <= coverage <= 0.99


# --- Holm --------------------------------------------------------------------------------------

def test_holm_known_vector():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.02, 0.03, 0.06, 0.06
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.01, None, 0.04, float("nan")]) == [pytest.approx(0.02), None, pytest.approx(0.04), None]
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert stats.holm([]) == []
    # never below the raw p-value, never above Bonferroni
    raw = [0.001, 0.2, 0.013, 0.04, 0.3]
    adjusted = stats.holm(raw)
    assert all(p <= a <= min(1.0, p * len(raw)) for p, a in zip(raw, adjusted))


# --- verdicts ----------------------------------------------------------------------------------

def test_verdict_texts():
    worse = stats.decide(p_adjusted=0.001, alpha=0.05, direction=1, lower_is_better=True, effect=3.2, low=1.8,
                         high=6.0)
    assert worse.verdict == "worse"
    assert worse.text == "worse (3.2x, CI 1.8x-6x, Holm p=0.001)"
    better = stats.decide(p_adjusted=0.01, alpha=0.05, direction=1, lower_is_better=False, effect=1.3, low=1.1,
                          high=1.5)
    assert better.verdict == "better" and better.text.startswith("better (1.3x")
    small = stats.decide(p_adjusted=0.4, alpha=0.05, direction=1, lower_is_better=True, effect=1.1, low=0.8,
                         high=1.5, detectable=1.8)
    assert small == stats.Verdict("no difference detected", "no difference detected (n too small to see a change "
                                                            "under 1.8x)")
    hopeless = stats.decide(p_adjusted=0.4, alpha=0.05, direction=1, lower_is_better=True, detectable=math.inf)
    assert hopeless.text == "no difference detected (n too small to see any difference)"
    custom = stats.decide(p_adjusted=0.4, alpha=0.05, direction=1, lower_is_better=True,
                          detectable_text="less than a move to 4/5 crashed trials, baseline 0/5")
    assert custom.text == ("no difference detected (n too small to see less than a move to 4/5 crashed trials, "
                           "baseline 0/5)")
    untested = stats.decide(p_adjusted=None, alpha=0.05, direction=0, lower_is_better=True,
                            no_test_reason="no crashes in either")
    assert untested.text == "no difference detected (no crashes in either)"


def test_verdict_min_difference():
    tiny = stats.decide(p_adjusted=0.001, alpha=0.05, direction=1, lower_is_better=True, effect=1.04, low=1.02,
                        high=1.06, min_difference=0.1)
    assert tiny.verdict == "no difference detected"
    assert tiny.text == "no difference detected (1.04x is within the 10% minimum difference)"
    equivalent = stats.decide(p_adjusted=0.5, alpha=0.05, direction=1, lower_is_better=True, effect=1.0, low=0.95,
                              high=1.05, min_difference=0.1, detectable=1.3)
    assert equivalent.text == "no difference detected (CI 0.95x-1.05x is within the 10% minimum difference)"
    could_see = stats.decide(p_adjusted=0.5, alpha=0.05, direction=1, lower_is_better=True, effect=1.0, low=0.7,
                             high=1.3, min_difference=0.25, detectable=1.2)
    assert could_see.text.startswith("no difference detected (a 25% difference would have shown")
    big = stats.decide(p_adjusted=0.001, alpha=0.05, direction=-1, lower_is_better=True, effect=0.5, low=0.4,
                       high=0.6, min_difference=0.1)
    assert big.verdict == "better"


# --- Tarone: tests that cannot reject stay out of the family ---------------------------------------

def test_smallest_attainable_p_values():
    assert stats.rate_min_p(6, 0.5) == pytest.approx(2 / 2 ** 6)        # all 6 crashes on one side
    assert stats.rate_min_p(0, 0.5) == 1.0
    assert stats.fisher_min_p(4, 4, 4) == pytest.approx(2 / comb(8, 4))  # [[4,0],[0,4]]: 0.0286
    assert stats.fisher_min_p(0, 5, 5) == 1.0 and stats.fisher_min_p(10, 5, 5) == 1.0


def test_tarone_size():
    assert stats.tarone_size([0.001]) == 1
    assert stats.tarone_size([0.03] * 8 + [0.001]) == 2     # the eight 0.03s can never reach 0.025
    assert stats.tarone_size([0.0]) == 1 and stats.tarone_size([]) == 1
    assert stats.tarone_size([0.0] * 6) == 6


def test_holm_tarone_known_vector():
    # Worked by hand: K is 2 at steps 1-4 (at most two min p below 0.025), 1 for the last test left.
    p = [0.001, 0.03, 0.5, 0.6, 0.012]
    min_p = [0.0, 0.03, 0.03, 0.03, 0.01]
    adjusted, thresholds = stats.holm_tarone(p, min_p)
    assert adjusted == pytest.approx([0.002, 0.06, 1.0, 1.0, 0.024])
    assert thresholds == pytest.approx([0.025, 0.025, 0.025, 0.05, 0.025])   # the last test alone: K=1
    assert stats.holm(p)[4] == pytest.approx(0.048)     # plain Holm: 4 x 0.012, barely


def test_holm_tarone_is_holm_for_continuous_tests():
    p = [0.01, 0.04, 0.03, 0.005, None]
    adjusted, thresholds = stats.holm_tarone(p, [0.0] * 5)
    assert adjusted == [pytest.approx(a) if a is not None else None for a in stats.holm(p)]
    assert thresholds[3] == pytest.approx(0.05 / 4) and thresholds[4] is None


def test_rank_test_exact_with_ties():
    # Complete separation with ties inside each side: still the single most extreme of C(12,6) = 924
    # arrangements, p = 2/924 exactly; scipy's default (normal approximation with ties) says 0.0047.
    result = stats.rank_test([1, 1, 2, 2, 3, 3], [4, 4, 5, 5, 6, 7])
    assert result.pvalue == pytest.approx(2 / 924)
    assert stats.compare_samples([1, 1, 2, 2, 3, 3], [4, 4, 5, 5, 6, 7], n_resamples=500).p_value == pytest.approx(2 / 924)


def test_rank_detectable_hand_checked():
    # [1..5] moved by f against [1..5]: at f just above 3, U = 23 of 25 and P(U >= 23) = 4/252, two-sided
    # 0.032 < 0.05; just above 2.5, U = 22 and 2 * 7/252 = 0.056. So the smallest visible move is 3x.
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert stats.rank_detectable(x, x, 0.05, direction=1) == pytest.approx(3.0)
    assert stats.rank_detectable(x, x, 0.05, direction=-1) == pytest.approx(3.0)
    assert stats.rank_detectable(x, x, 0.01, direction=1) == pytest.approx(5.0)   # needs full separation
    assert stats.rank_detectable(x, x, 0.005) == math.inf                          # 5 vs 5 cannot reach it
    assert stats.rank_detectable([2.0] * 5, [1.0] * 5, 0.05) == 1.0                # no spread: any move shows


def test_verdict_no_spread():
    same = stats.decide(p_adjusted=1.0, alpha=0.05, direction=0, lower_is_better=True, effect=1.0, low=1.0,
                        high=1.0, detectable=1.0)
    assert same.text == "no difference detected (no spread between trials: any shift would have shown)"
