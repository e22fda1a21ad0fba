"""Statistics for comparing variants: pure functions over per-trial numbers (no I/O).

The unit of replication is the trial. Crash counts are rates over exposure (host-hours, requests)
with exact Poisson intervals; crashed/not-crashed trials go through Fisher's exact test; per-trial
metrics (latency percentiles, throughput, peak RSS) go through a Mann-Whitney U test with a seeded
bootstrap interval of the ratio of medians. Raw samples are never pooled across trials. Across a
table of such tests: Tarone's K (leave out tests that cannot reach significance whatever the data)
and Holm's step-down adjustment.

Conventions
- Every interval is two-sided at `confidence` (0.95 unless given); a *bound* is one-sided.
- Ratios are variant / baseline. Unbounded or undefined values are float("inf") or float("nan") here;
  the JSON layer (harness.analysis.compare) turns them into null.
- ``detectable`` is the smallest change that would have come out significant at the given alpha had
  it been observed with the same counts or spread (test inversion); a true change of that size is seen
  about half the time. harness.analysis.compare passes each row the threshold it faces in the Holm-Tarone
  step-down, so "n too small to see X" holds after the correction.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import special, stats
from scipy.stats.contingency import odds_ratio

ALPHA = 0.05
CONFIDENCE = 0.95

INF = math.inf
NAN = math.nan

BETTER, WORSE, NO_DIFFERENCE = "better", "worse", "no difference detected"


# --- crash counts over exposure --------------------------------------------------------------

@dataclass(frozen=True)
class Rate:
    """Events per unit of exposure, with an exact (Garwood) Poisson interval."""

    events: int
    exposure: float
    rate: float
    low: float
    high: float
    confidence: float
    # Zero events only (None otherwise): never report "0", report how high the rate could be.
    upper_bound: float | None = None        # exact one-sided bound at `confidence`: -ln(1 - c) / exposure
    rule_of_three: float | None = None      # 3 / exposure (the 95% rule of thumb)


def poisson_interval(events: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Exact (Garwood) two-sided interval for a Poisson mean, from chi-square quantiles."""
    if events < 0:
        raise ValueError("events must be >= 0")
    tail = (1.0 - confidence) / 2.0
    low = 0.0 if events == 0 else float(stats.chi2.ppf(tail, 2 * events) / 2.0)
    high = float(stats.chi2.ppf(1.0 - tail, 2 * events + 2) / 2.0)
    return low, high


def poisson_upper_bound(events: int, confidence: float = CONFIDENCE) -> float:
    """Exact one-sided upper bound for a Poisson mean (for 0 events at 95%: -ln 0.05 = 2.996)."""
    return float(stats.chi2.ppf(confidence, 2 * events + 2) / 2.0)


def poisson_rate(events: int, exposure: float, confidence: float = CONFIDENCE) -> Rate:
    """Rate = events / exposure with its exact interval; zero events also give the one-sided bounds."""
    if exposure <= 0:
        return Rate(events, exposure, NAN, NAN, NAN, confidence)
    low, high = poisson_interval(events, confidence)
    if events == 0:
        return Rate(0, exposure, 0.0, 0.0, high / exposure, confidence,
                    upper_bound=poisson_upper_bound(0, confidence) / exposure, rule_of_three=3.0 / exposure)
    return Rate(events, exposure, events / exposure, low / exposure, high / exposure, confidence)


@dataclass(frozen=True)
class ProportionBound:
    """'0 of n' as a bound on the per-trial probability, never as 0%."""

    successes: int
    trials: int
    upper_bound: float          # exact (Clopper-Pearson) one-sided bound at `confidence`
    rule_of_three: float        # 3 / n
    confidence: float


def zero_of_n_bound(trials: int, confidence: float = CONFIDENCE) -> ProportionBound:
    """Upper bound on a probability when none of `trials` had the event (exact: 1 - (1-c)^(1/n))."""
    if trials < 1:
        return ProportionBound(0, trials, 1.0, INF, confidence)
    result = stats.binomtest(0, trials, alternative="less")
    return ProportionBound(0, trials, float(result.proportion_ci(confidence, method="exact").high),
                           3.0 / trials, confidence)


@dataclass(frozen=True)
class RateRatio:
    """Rate of the variant over the rate of the baseline, by the exact conditional (binomial) method.

    Given n = k1 + k2 events, k1 is Binomial(n, p) with p = R e1 / (R e1 + e2) where R is the rate
    ratio; equal rates means p0 = e1 / (e1 + e2). The interval is the Clopper-Pearson interval of p
    mapped to R; the p-value is scipy's exact two-sided binomial test of p = p0.
    """

    events: tuple[int, int]
    exposure: tuple[float, float]
    ratio: float                # inf when only the variant crashed, nan when neither did
    low: float
    high: float
    p_value: float
    confidence: float
    detectable: float           # smallest ratio (a factor >= 1, in the observed direction) that would be flagged


def rate_ratio(k1: int, e1: float, k2: int, e2: float, confidence: float = CONFIDENCE,
               alpha: float = ALPHA) -> RateRatio:
    if e1 <= 0 or e2 <= 0:
        raise ValueError("exposures must be positive")
    n = k1 + k2
    if n == 0:
        return RateRatio((k1, k2), (e1, e2), NAN, 0.0, INF, 1.0, confidence, INF)
    p0 = e1 / (e1 + e2)
    test = stats.binomtest(k1, n, p0)
    ci = test.proportion_ci(confidence, method="exact")

    def to_ratio(p: float) -> float:
        return INF if p >= 1.0 else (p / (1.0 - p)) * (e2 / e1)

    ratio = INF if k2 == 0 else (k1 / e1) / (k2 / e2)
    return RateRatio((k1, k2), (e1, e2), ratio, to_ratio(float(ci.low)), to_ratio(float(ci.high)),
                     float(test.pvalue), confidence,
                     rate_ratio_detectable(n, e1, e2, alpha, 1 if ratio > 1 else -1 if ratio < 1 else 0))


def _first_true(lo: int, hi: int, predicate: Callable[[int], bool]) -> int | None:
    """Smallest k in [lo, hi] with predicate(k), for a predicate monotone over that range."""
    if lo > hi or not predicate(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if predicate(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def rate_ratio_detectable(n: int, e1: float, e2: float, alpha: float = ALPHA, direction: int = 0) -> float:
    """With n events in all over exposures e1, e2: the smallest rate ratio (a factor >= 1) whose split
    the conditional binomial test flags at alpha, upwards (direction > 0), downwards (< 0), or the larger
    of the two (0: a change that size shows either way); inf when no split is flagged."""
    if n < 1:
        return INF
    p0 = e1 / (e1 + e2)

    def significant(k: int) -> bool:
        return bool(stats.binomtest(k, n, p0).pvalue < alpha)

    def as_ratio(k: int) -> float:
        return INF if k == n else (k / (n - k)) * (e2 / e1)

    centre = int(round(n * p0))
    up = _first_true(centre, n, significant)
    # Downwards: the largest k <= centre that is significant, found on the mirrored predicate.
    down = _first_true(0, centre, lambda j: significant(centre - j))
    up_factor = INF if up is None else as_ratio(up)
    down_factor = INF if down is None or centre - down == 0 else 1.0 / as_ratio(centre - down)
    return _pick(up_factor, down_factor, direction)


def _pick(up: float, down: float, direction: int) -> float:
    return up if direction > 0 else down if direction < 0 else max(up, down)


# --- crashed / not-crashed trials ------------------------------------------------------------

@dataclass(frozen=True)
class TrialsTest:
    """Fisher's exact test on [[variant crashed, not], [baseline crashed, not]].

    The odds ratio is the conditional maximum-likelihood estimate with its exact interval (both from
    scipy.stats.contingency.odds_ratio), so the estimate always lies inside the interval.
    """

    crashed: tuple[int, int]
    trials: tuple[int, int]
    odds_ratio: float
    low: float
    high: float
    p_value: float
    confidence: float
    # Crashed-trial counts of the variant (baseline as observed) that would have been flagged:
    detectable_low: int | None      # the largest count below the baseline's share that would show
    detectable_high: int | None     # the smallest count above it that would show


def fisher_trials(crashed1: int, n1: int, crashed2: int, n2: int, confidence: float = CONFIDENCE,
                  alpha: float = ALPHA) -> TrialsTest:
    table = [[crashed1, n1 - crashed1], [crashed2, n2 - crashed2]]
    p_value = float(stats.fisher_exact(table).pvalue)
    if (crashed1 + crashed2) in (0, n1 + n2):
        estimate, low, high = NAN, 0.0, INF
    else:
        result = odds_ratio(table, kind="conditional")
        ci = result.confidence_interval(confidence)
        estimate, low, high = float(result.statistic), float(ci.low), float(ci.high)

    low_k, high_k = fisher_detectable(crashed2, n1, n2, alpha)
    return TrialsTest((crashed1, crashed2), (n1, n2), estimate, low, high, p_value, confidence, low_k, high_k)


def fisher_detectable(crashed2: int, n1: int, n2: int, alpha: float = ALPHA) -> tuple[int | None, int | None]:
    """With the baseline at crashed2 of n2 trials: the largest crashed count of n1 below its share and the
    smallest above it that Fisher's test flags at alpha (None: none would be)."""
    def significant(k: int) -> bool:
        return bool(stats.fisher_exact([[k, n1 - k], [crashed2, n2 - crashed2]]).pvalue < alpha)

    centre = int(round(n1 * crashed2 / n2)) if n2 else 0
    up = _first_true(centre, n1, significant)
    down = _first_true(0, centre, lambda j: significant(centre - j))
    return (None if down is None else centre - down), up


# --- time to first crash ---------------------------------------------------------------------

@dataclass(frozen=True)
class FirstCrash:
    """Time to each trial's first crash; trials without a crash are censored at their end."""

    trials: int
    crashed: int
    censored: int
    median: float | None        # Kaplan-Meier median (None while fewer than half the trials crashed)
    earliest: float | None
    latest: float | None        # of the trials that crashed
    censored_at: float | None   # the shortest censoring time (how long the crash-free trials ran)


def _censored(times: Sequence[float | None], ends: Sequence[float]) -> stats.CensoredData:
    crashed = [max(float(t), 0.0) for t in times if t is not None]
    right = [max(float(e), 0.0) for t, e in zip(times, ends) if t is None]
    return stats.CensoredData(uncensored=crashed, right=right)


def first_crash_summary(times: Sequence[float | None], ends: Sequence[float]) -> FirstCrash:
    """times[i]: first crash of trial i (None: no crash); ends[i]: how long trial i ran."""
    if len(times) != len(ends):
        raise ValueError("times and ends differ in length")
    crashed = [float(t) for t in times if t is not None]
    censored = [float(e) for t, e in zip(times, ends) if t is None]
    median = None
    if crashed:
        sf = stats.ecdf(_censored(times, ends)).sf
        below = np.nonzero(sf.probabilities <= 0.5)[0]
        median = float(sf.quantiles[below[0]]) if below.size else None
    return FirstCrash(len(times), len(crashed), len(censored), median, min(crashed, default=None),
                      max(crashed, default=None), min(censored, default=None))


@dataclass(frozen=True)
class FirstCrashTest:
    """Log-rank test of time to first crash, variant (x) against baseline (y)."""

    statistic: float            # > 0: the variant crashes sooner than expected under equal hazards
    p_value: float              # nan when no trial crashed in either
    time_ratio: float           # ratio of Kaplan-Meier medians (variant / baseline); nan if either is undefined
    events: int                 # first crashes in both together
    detectable: float           # smallest time ratio (as a factor >= 1) seen with these events (Schoenfeld)


def first_crash_test(times1: Sequence[float | None], ends1: Sequence[float], times2: Sequence[float | None],
                     ends2: Sequence[float], alpha: float = ALPHA) -> FirstCrashTest:
    events = sum(t is not None for t in times1) + sum(t is not None for t in times2)
    m1, m2 = first_crash_summary(times1, ends1).median, first_crash_summary(times2, ends2).median
    ratio = m1 / m2 if m1 is not None and m2 else NAN
    if events == 0 or not times1 or not times2:
        return FirstCrashTest(NAN, NAN, ratio, events, INF)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.logrank(_censored(times1, ends1), _censored(times2, ends2))
    detectable = first_crash_detectable(events, len(times1), len(times2), alpha)
    return FirstCrashTest(float(result.statistic), float(result.pvalue), ratio, events, detectable)


def first_crash_detectable(events: int, n1: int, n2: int, alpha: float = ALPHA) -> float:
    """Schoenfeld: with D first crashes the log-rank test sees a log hazard ratio of z * sqrt(1 / (D q1 q2))
    (50% power, like every `detectable`); under exponential times the time ratio is 1 / HR, the same factor."""
    if events < 1 or n1 < 1 or n2 < 1:
        return INF
    q1 = n1 / (n1 + n2)
    return math.exp(stats.norm.ppf(1 - alpha / 2) * math.sqrt(1.0 / (events * q1 * (1 - q1))))


# --- per-trial metrics -------------------------------------------------------------------------

@dataclass(frozen=True)
class SampleComparison:
    """One value per trial for each side: Mann-Whitney U and a bootstrap interval of the median ratio."""

    n: tuple[int, int]
    medians: tuple[float, float]
    ratio: float                # median(x) / median(y); nan when median(y) is 0
    low: float                  # bootstrap interval (BCa, seeded; percentile when BCa degenerates)
    high: float
    p_value: float              # Mann-Whitney U, two-sided (exact when small; see rank_test)
    direction: int              # +1: the variant's values tend to be larger (U / n1 n2 > 1/2), -1 smaller, 0 even
    min_p: float                # the smallest two-sided p-value possible with these n (exact test, no ties)
    detectable: float           # smallest shift (factor >= 1, observed direction) the U test flags with this spread
    confidence: float
    interval_method: str        # BCa | percentile | none


def min_rank_p(n1: int, n2: int) -> float:
    """The smallest two-sided exact Mann-Whitney p-value for sample sizes n1, n2 (complete separation)."""
    if n1 < 1 or n2 < 1:
        return 1.0
    return min(1.0, 2.0 / float(special.comb(n1 + n2, n1, exact=True)))


def _ratio_of_medians(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.median(x, axis=axis) / np.median(y, axis=axis)


def bootstrap_ratio_of_medians(x: Sequence[float], y: Sequence[float], *, seed: int | Sequence[int] = 0,
                               confidence: float = CONFIDENCE, n_resamples: int = 9999) -> tuple[float, float, str]:
    """(low, high, method) of median(x)/median(y) by scipy.stats.bootstrap, resampling each side on its own.

    Deterministic for a given seed. BCa first; when it degenerates (few distinct values) the percentile
    interval; (nan, nan, "none") with fewer than 3 values a side (2 values give 3 distinct medians:
    no interval worth the name) or when y has values <= 0.
    """
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xs.size < 3 or ys.size < 3 or np.any(ys <= 0):
        return NAN, NAN, "none"
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = stats.bootstrap((xs, ys), _ratio_of_medians, n_resamples=n_resamples, vectorized=True,
                                     paired=False, confidence_level=confidence, method=method,
                                     rng=np.random.default_rng(seed))
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
        if math.isfinite(low) and math.isfinite(high):
            return low, high, method
    return NAN, NAN, "none"


EXACT_PERMUTATIONS = 5000   # with ties, the exact permutation test up to this many arrangements


def rank_test(x: Sequence[float], y: Sequence[float]) -> Any:
    """Mann-Whitney U, two-sided (scipy.stats.mannwhitneyu).

    scipy's exact method assumes no ties and falls back to the normal approximation when there are
    some; per-trial values tie often (identical peak RSS in pages, identical throughput), so with ties
    and at most EXACT_PERMUTATIONS arrangements the p-value is the exact permutation one
    (scipy.stats.PermutationMethod over every arrangement: deterministic, no random numbers).
    """
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    tied = np.unique(np.concatenate([xs, ys])).size < xs.size + ys.size
    # scipy's permutation test needs two values a side; one trial a side can never be significant anyway
    if tied and min(xs.size, ys.size) >= 2 \
            and special.comb(xs.size + ys.size, xs.size, exact=True) <= EXACT_PERMUTATIONS:
        return stats.mannwhitneyu(xs, ys, alternative="two-sided", method=stats.PermutationMethod(n_resamples=np.inf))
    return stats.mannwhitneyu(xs, ys, alternative="two-sided")


def rank_detectable(x: Sequence[float], y: Sequence[float], alpha: float = ALPHA, direction: int = 0) -> float:
    """The smallest factor f >= 1 at which the rank test flags the variant's trials moved by f: upwards
    (direction > 0), downwards (< 0), or the larger of the two (0: a move that size shows either way).

    The variant's values are first scaled to the baseline's median (their spread kept); the test's
    p-value only changes where a scaled value crosses a baseline value, so the candidates are those
    ratios, searched by bisection. 1.0 when neither side has any spread (any shift shows); inf when
    no shift is flagged (too few trials, or ties that keep p above alpha).
    """
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xs.size < 1 or ys.size < 1 or min_rank_p(xs.size, ys.size) >= alpha:
        return INF
    mx, my = float(np.median(xs)), float(np.median(ys))
    if mx <= 0 or my <= 0 or np.any(xs <= 0) or np.any(ys <= 0):
        return INF
    base = xs * (my / mx)
    if np.unique(base).size == 1 and np.unique(ys).size == 1:
        return 1.0 if rank_test(base * 1.001, ys).pvalue < alpha else INF
    crossings = np.unique((ys[:, None] / base[None, :]).ravel())
    found = []
    for candidates, factor_of in ((crossings[crossings > 1.0] * (1 + 1e-9), lambda f: f),
                                  (crossings[crossings < 1.0][::-1] * (1 - 1e-9), lambda f: 1.0 / f)):
        def flagged(i: int) -> bool:
            return bool(rank_test(base * candidates[i], ys).pvalue < alpha)

        first = _first_true(0, candidates.size - 1, flagged) if candidates.size else None
        found.append(INF if first is None else float(factor_of(candidates[first])))
    return _pick(found[0], found[1], direction)


def compare_samples(x: Sequence[float], y: Sequence[float], *, seed: int | Sequence[int] = 0,
                    confidence: float = CONFIDENCE, alpha: float | None = ALPHA,
                    n_resamples: int = 9999) -> SampleComparison:
    """x: the variant's per-trial values, y: the baseline's (alpha None: skip `detectable`, left nan)."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n = (int(xs.size), int(ys.size))
    mx = float(np.median(xs)) if xs.size else NAN
    my = float(np.median(ys)) if ys.size else NAN
    ratio = mx / my if ys.size and xs.size and my != 0 else NAN
    if min(n) < 1:
        return SampleComparison(n, (mx, my), ratio, NAN, NAN, NAN, 0, 1.0, INF, confidence, "none")
    test = rank_test(xs, ys)
    share = float(test.statistic) / (n[0] * n[1])
    direction = 1 if share > 0.5 else -1 if share < 0.5 else 0
    low, high, method = bootstrap_ratio_of_medians(xs, ys, seed=seed, confidence=confidence, n_resamples=n_resamples)
    return SampleComparison(n, (mx, my), ratio, low, high, float(test.pvalue), direction, min_rank_p(*n),
                            NAN if alpha is None else rank_detectable(xs, ys, alpha, direction), confidence, method)


# --- multiple comparisons ----------------------------------------------------------------------

def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm step-down adjusted p-values (controls the family-wise error rate under any dependence).

    None or nan entries are not tests: they stay None and do not count in the family.
    """
    index = [i for i, p in enumerate(p_values) if p is not None and not math.isnan(p)]
    adjusted: list[float | None] = [None] * len(p_values)
    if not index:
        return adjusted
    values = np.array([p_values[i] for i in index], dtype=float)
    order = np.argsort(values, kind="stable")
    m = len(values)
    stepped = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * values[order]))
    for position, original in enumerate(order):
        adjusted[index[original]] = float(stepped[position])
    return adjusted


def rate_min_p(events: int, p0: float) -> float:
    """Smallest p-value the conditional rate test can give with `events` in all (all on one side)."""
    if events < 1:
        return 1.0
    return float(min(stats.binomtest(0, events, p0).pvalue, stats.binomtest(events, events, p0).pvalue))


def fisher_min_p(crashed: int, n1: int, n2: int) -> float:
    """Smallest Fisher p-value over the tables with these margins (`crashed` trials crashed in all)."""
    lo, hi = max(0, crashed - n2), min(n1, crashed)
    if lo >= hi:
        return 1.0
    return min(float(stats.fisher_exact([[k, n1 - k], [crashed - k, n2 - crashed + k]]).pvalue)
               for k in range(lo, hi + 1))


def tarone_size(min_p_values: Sequence[float], alpha: float = ALPHA) -> int:
    """Tarone's K: the smallest k >= 1 such that at most k tests can reach p < alpha / k.

    Discrete tests whose smallest possible p-value (known from the sample sizes or margins alone) is
    not below alpha / K cannot reject; only the others share alpha. For continuous tests (min p 0)
    K is the number of tests, and Bonferroni.
    """
    k = 1
    while sum(1 for p in min_p_values if p < alpha / k) > k:
        k += 1
    return k


def holm_tarone(p_values: Sequence[float | None], min_p_values: Sequence[float],
                alpha: float = ALPHA) -> tuple[list[float | None], list[float | None]]:
    """Holm's step-down with Tarone's K in place of the count of remaining tests (Hommel & Krummenauer 1998).

    Tests in ascending p; at each step K is Tarone's K of the tests not yet rejected and the test is
    rejected when K * p < alpha (and every earlier one was). Controls the family-wise error at alpha:
    the first true null rejected, with R the tests left then and T the true nulls, had
    p < alpha/K(R) <= alpha/K(T), which at most K(T) true nulls can reach, each with probability
    below alpha/K(T). With continuous tests (min p 0) it is exactly Holm.

    Returns (adjusted p-values: reject iff < alpha, K depending on alpha; the threshold alpha/K each
    test faced at its step). None or nan p-values are not tests and stay None.
    """
    if len(p_values) != len(min_p_values):
        raise ValueError("p_values and min_p_values differ in length")
    index = [i for i, p in enumerate(p_values) if p is not None and not math.isnan(p)]
    order = sorted(index, key=lambda i: (p_values[i], i))
    adjusted: list[float | None] = [None] * len(p_values)
    thresholds: list[float | None] = [None] * len(p_values)
    running = 0.0
    for step, i in enumerate(order):
        k = tarone_size([min_p_values[j] for j in order[step:]], alpha)
        running = max(running, min(1.0, k * float(p_values[i])))  # type: ignore[arg-type]
        adjusted[i], thresholds[i] = running, alpha / k
    return adjusted, thresholds


# --- verdicts ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    verdict: str                # better | worse | no difference detected
    text: str                   # the verdict with its reason, for people


def fmt_ratio(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    if math.isinf(value):
        return "inf"
    if 0.99 < value < 1.01 and value != 1.0:
        return f"{value:.4g}x"      # 1.004x, not 1x
    return f"{value:.3g}x"


def decide(*, p_adjusted: float | None, alpha: float, direction: int, lower_is_better: bool,
           effect: float | None = None, low: float | None = None, high: float | None = None,
           min_difference: float | None = None, detectable: float | None = None,
           detectable_text: str | None = None, no_test_reason: str | None = None,
           effect_text: str | None = None) -> Verdict:
    """The verdict of one comparison row.

    Significant (Holm-adjusted p < alpha) and in a direction: better or worse, unless the effect (a ratio)
    is within the minimum meaningful difference. Otherwise "no difference detected" with the reason: what
    n could have seen (`detectable`, a factor >= 1, or `detectable_text`), or that the interval lies
    within the minimum difference.
    """
    band = None if min_difference is None else 1.0 + min_difference

    def within(value: float | None) -> bool:
        return (band is not None and value is not None and not math.isnan(value) and 1.0 / band <= value <= band)

    if p_adjusted is None or math.isnan(p_adjusted):
        return Verdict(NO_DIFFERENCE, f"{NO_DIFFERENCE} ({no_test_reason or 'no test possible'})")
    if p_adjusted < alpha and direction != 0:
        if within(effect):
            return Verdict(NO_DIFFERENCE, f"{NO_DIFFERENCE} ({fmt_ratio(effect)} is within the "
                                          f"{min_difference:.0%} minimum difference)")
        worse = (direction > 0) == lower_is_better
        where = effect_text or (fmt_ratio(effect) if effect is not None and not math.isnan(effect) else "a shift")
        if low is not None and high is not None and not (math.isnan(low) or math.isnan(high)):
            where += f", CI {fmt_ratio(low)}-{fmt_ratio(high)}"
        return Verdict(WORSE if worse else BETTER, f"{WORSE if worse else BETTER} ({where}, Holm p={p_adjusted:.2g})")
    if within(low) and within(high):
        return Verdict(NO_DIFFERENCE, f"{NO_DIFFERENCE} (CI {fmt_ratio(low)}-{fmt_ratio(high)} is within the "
                                      f"{min_difference:.0%} minimum difference)")
    if detectable_text is not None:
        return Verdict(NO_DIFFERENCE, f"{NO_DIFFERENCE} (n too small to see {detectable_text})")
    if detectable is None or math.isinf(detectable) or math.isnan(detectable):
        return Verdict(NO_DIFFERENCE, f"{NO_DIFFERENCE} (n too small to see any difference)")
    if detectable < 1.0 + 1e-6:
        return Verdict(NO_DIFFERENCE, f"{NO_DIFFERENCE} (no spread between trials: any shift would have shown)")
    if band is not None and detectable <= band:
        return Verdict(NO_DIFFERENCE, f"{NO_DIFFERENCE} (a {min_difference:.0%} difference would have shown: "
                                      f"changes from {fmt_ratio(detectable)} were visible)")
    return Verdict(NO_DIFFERENCE, f"{NO_DIFFERENCE} (n too small to see a change under {fmt_ratio(detectable)})")
