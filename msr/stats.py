"""Mean and 95% confidence interval, the way every number in the docs is reported, and paired
comparisons of two methods on the same seeds or episodes (t-interval of the mean difference,
exact sign and Wilcoxon signed-rank tests); every quantile and p-value is computed here (no
scipy needed)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def mean_ci95(values: Tensor | Iterable[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% Student-t confidence interval of the mean, over
    independent values (e.g. the per-episode accuracies of a test)."""
    values = torch.as_tensor(values).detach().double().flatten()
    count = values.numel()
    if count < 2:
        raise ValueError(f"a confidence interval needs at least 2 values, got {count}")
    sem = values.std(unbiased=True).item() / math.sqrt(count)
    return values.mean().item(), t_quantile(0.975, count - 1) * sem


@dataclass(frozen=True)
class PairedComparison:
    """How far ``a`` lies above ``b`` over paired values (``a[i]`` and ``b[i]`` measured on the
    same seed, or the same episode): the mean difference a - b with the half-width of its 95%
    t-interval, the counts of pairs where a is above, below and equal to b, and the exact
    two-sided p-values of the sign test and of the Wilcoxon signed-rank test."""

    count: int
    mean_difference: float
    ci95: float
    above: int
    below: int
    ties: int
    sign_test_p: float
    wilcoxon_p: float

    @property
    def verdict(self) -> str:
        """ "established" when the 95% interval of the mean difference lies above zero,
        "reversed" when it lies below, else "not established"."""
        if self.mean_difference - self.ci95 > 0:
            return "established"
        if self.mean_difference + self.ci95 < 0:
            return "reversed"
        return "not established"


def compare_paired(a: Tensor | Iterable[float], b: Tensor | Iterable[float]) -> PairedComparison:
    """Compare ``a`` with ``b`` pair by pair (see ``PairedComparison``); at least 2 pairs."""
    a, b = (torch.as_tensor(v).detach().double().flatten() for v in (a, b))
    if a.shape != b.shape:
        raise ValueError(f"paired values need equal counts, got {a.numel()} and {b.numel()}")
    differences = a - b
    mean, ci95 = mean_ci95(differences)
    return PairedComparison(
        count=differences.numel(),
        mean_difference=mean,
        ci95=ci95,
        above=int((differences > 0).sum()),
        below=int((differences < 0).sum()),
        ties=int((differences == 0).sum()),
        sign_test_p=sign_test_p(differences),
        wilcoxon_p=wilcoxon_p(differences),
    )


def sign_test_p(differences: Tensor | Iterable[float]) -> float:
    """Exact two-sided sign test of "positive and negative differences are equally likely":
    zeros are dropped; 1.0 when nothing is left."""
    differences = torch.as_tensor(differences).double().flatten()
    positive, negative = int((differences > 0).sum()), int((differences < 0).sum())
    count = positive + negative
    tail = sum(math.comb(count, k) for k in range(min(positive, negative) + 1)) / 2.0**count
    return min(1.0, 2 * tail)


def wilcoxon_p(differences: Tensor | Iterable[float]) -> float:
    """Exact two-sided Wilcoxon signed-rank test of "the differences are symmetric about zero".

    Zeros are dropped (scipy's ``zero_method="wilcox"``), tied magnitudes share their mean rank,
    and the null distribution of the positive rank sum is exact for those ranks (every sign
    equally likely), so ties need no normal approximation. 1.0 when nothing is left."""
    differences = torch.as_tensor(differences).double().flatten()
    differences = differences[differences != 0]
    if differences.numel() == 0:
        return 1.0
    magnitudes = differences.abs()
    order = magnitudes.argsort()
    ranks = torch.empty_like(magnitudes)
    ranks[order] = torch.arange(1, magnitudes.numel() + 1, dtype=torch.double)
    for value in magnitudes.unique():  # tied magnitudes share the mean of their ranks
        tied = magnitudes == value
        ranks[tied] = ranks[tied].mean()
    doubled = (2 * ranks).round().long()  # mean ranks are halves: twice them are integers
    observed = int(doubled[differences > 0].sum())
    distribution = np.zeros(int(doubled.sum()) + 1)
    distribution[0], reach = 1.0, 0  # P(positive sum = s) for s <= reach, the largest so far
    for rank in doubled.tolist():  # each rank joins the positive sum with probability 1/2
        distribution[rank : reach + rank + 1] += distribution[: reach + 1].copy()
        distribution[: reach + rank + 1] /= 2
        reach += rank
    lower, upper = distribution[: observed + 1].sum(), distribution[observed:].sum()
    return min(1.0, 2 * float(min(lower, upper)))


def t_quantile(probability: float, degrees: float) -> float:
    """The ``probability`` quantile of Student's t with ``degrees`` degrees of freedom (scipy's
    ``t.ppf``), to about 1e-12: bisection on the distribution function."""
    if not 0 < probability < 1 or not degrees > 0:
        raise ValueError(f"need 0 < probability < 1 and degrees > 0, got {probability}, {degrees}")
    if probability < 0.5:
        return -t_quantile(1 - probability, degrees)
    low, high = 0.0, 1.0
    while _t_cdf(high, degrees) < probability:
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if _t_cdf(middle, degrees) < probability else (low, middle)
        if high - low <= 1e-13 * high:
            break
    return (low + high) / 2


def _t_cdf(t: float, degrees: float) -> float:
    """P(T <= t) for t >= 0: 1 - I_x(degrees / 2, 1 / 2) / 2 with x = degrees / (degrees + t^2)."""
    return 1.0 - 0.5 * _incomplete_beta(degrees / (degrees + t * t), degrees / 2, 0.5)


def _incomplete_beta(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (Lentz)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below this point
        return 1.0 - _incomplete_beta(1 - x, b, a)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(log_front + a * math.log(x) + b * math.log1p(-x)) / a
    tiny, c, d = 1e-300, 1.0, 0.0
    result = 1.0
    for m in range(0, 10_000):
        for step in (0, 1):
            if m == 0 and step == 0:
                numerator = 1.0
            elif step == 0:
                numerator = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
            else:
                numerator = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * (result - 1.0)
