"""msr.stats: the mean ± 95% t-interval every reported number uses, and the paired tests of
methods on the same seeds or episodes, against scipy and against enumeration."""

import itertools

import numpy as np
import pytest
import scipy.stats
import torch

from msr.stats import compare_paired, mean_ci95, sign_test_p, t_quantile, wilcoxon_p


@pytest.mark.parametrize("degrees", [1, 2, 3, 4, 7, 29, 99, 599, 10_000])
@pytest.mark.parametrize("probability", [0.975, 0.995, 0.6, 0.025])
def test_the_t_quantile_equals_scipys(degrees, probability):
    expected = scipy.stats.t.ppf(probability, degrees)
    assert t_quantile(probability, degrees) == pytest.approx(expected, rel=1e-10)


def test_mean_ci95_equals_scipys_interval():
    values = torch.randn(600, generator=torch.Generator().manual_seed(3)) * 7 + 90
    mean, half = mean_ci95(values)
    low, high = scipy.stats.t.interval(
        0.95, 599, loc=values.double().mean(), scale=scipy.stats.sem(values.double())
    )
    assert mean == pytest.approx((low + high) / 2, rel=1e-12)
    assert half == pytest.approx((high - low) / 2, rel=1e-9)
    assert mean_ci95([1.0, 2.0, 3.0]) == pytest.approx((2.0, scipy.stats.t.ppf(0.975, 2) / 3**0.5))
    with pytest.raises(ValueError, match="at least 2 values"):
        mean_ci95([1.0])
    with pytest.raises(ValueError, match="0 < probability < 1"):
        t_quantile(1.0, 3)


@pytest.mark.parametrize("count", [5, 8, 13])
def test_the_exact_wilcoxon_and_sign_tests_equal_scipys_without_ties(count):
    rng = np.random.default_rng(count)
    for shift in (0.0, 0.4, 1.5):
        differences = rng.normal(shift, 1.0, count)
        expected = scipy.stats.wilcoxon(differences, method="exact").pvalue
        assert wilcoxon_p(differences) == pytest.approx(expected, rel=1e-12)
        positive = int((differences > 0).sum())
        assert sign_test_p(differences) == pytest.approx(
            scipy.stats.binomtest(positive, count).pvalue, rel=1e-12
        )


def test_the_wilcoxon_test_with_ties_and_zeros_is_exact_by_enumeration():
    """Zeros dropped, tied magnitudes at their mean rank: the p-value is the share of the 2^n
    sign patterns whose positive rank sum lies at least as far out as the observed one."""
    differences = np.array([0.0, 0.04, -0.04, 0.04, 0.08, -0.12, 0.08, 0.0, 0.16, 0.04, -0.08])
    kept = differences[differences != 0]
    ranks = scipy.stats.rankdata(np.abs(kept))  # mean ranks for ties
    observed = ranks[kept > 0].sum()
    sums = [
        sum(r for r, s in zip(ranks, signs, strict=True) if s)
        for signs in itertools.product((0, 1), repeat=len(kept))
    ]
    sums = np.array(sums)
    expected = 2 * min((sums <= observed + 1e-9).mean(), (sums >= observed - 1e-9).mean())
    assert wilcoxon_p(differences) == pytest.approx(min(1.0, expected), rel=1e-12)
    assert wilcoxon_p([0.0, 0.0]) == 1.0 and sign_test_p([0.0]) == 1.0


def test_the_exact_wilcoxon_test_on_600_tied_episodes_matches_the_normal_approximation():
    """At the size of a test (600 episodes, accuracies in steps of 1/25, many ties) the exact
    p-value is near scipy's tie-corrected normal approximation, and is quick."""
    rng = np.random.default_rng(7)
    differences = (rng.integers(0, 6, 600) - rng.integers(0, 5, 600)) / 25
    approx = scipy.stats.wilcoxon(differences, method="approx", correction=False).pvalue
    assert wilcoxon_p(differences) == pytest.approx(approx, abs=2e-3)


def test_a_paired_comparison_counts_the_pairs_and_gives_a_verdict():
    above = compare_paired([91.0, 92.5, 90.0, 93.0, 91.5], [88.0, 88.5, 89.0, 88.0, 91.5])
    assert (above.count, above.above, above.below, above.ties) == (5, 4, 0, 1)
    assert (above.mean_difference, above.ci95) == pytest.approx(mean_ci95([3, 4, 1, 5, 0]))
    assert above.verdict == "established"
    assert above.sign_test_p == pytest.approx(0.125) and above.wilcoxon_p == pytest.approx(0.125)
    assert compare_paired([1.0, 2.0, 3.0], [2.0, 3.5, 4.0]).verdict == "reversed"
    assert compare_paired([1.0, 2.0, 3.0], [2.0, 1.5, 3.2]).verdict == "not established"
    # five seeds cannot reach p < 0.05 with either exact test, however clear the lead
    clear = compare_paired([95.0, 95.5, 96.0, 95.2, 95.8], [90.0, 91.0, 90.5, 90.2, 91.1])
    assert clear.verdict == "established" and clear.wilcoxon_p == clear.sign_test_p == 0.0625
    with pytest.raises(ValueError, match="equal counts"):
        compare_paired([1.0, 2.0], [1.0])
