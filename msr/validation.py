"""Argument checks that fail early with the offending value in the message."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is a positive ``int`` (bools excluded), else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_shape(name: str, tensor: Tensor, expected: Sequence[int]) -> None:
    """Raise ``ValueError`` unless ``tensor`` has exactly the shape ``expected``."""
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(tensor.shape)}")
