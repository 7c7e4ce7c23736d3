"""Mean and 95% confidence interval, the way every number in the docs is reported, with the
Student-t quantile computed here (no scipy needed)."""

from __future__ import annotations

import math
from collections.abc import Iterable

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
