"""msr.stats: the mean ± 95% t-interval every reported number uses, against scipy."""

import pytest
import scipy.stats
import torch

from msr.stats import mean_ci95, t_quantile


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
