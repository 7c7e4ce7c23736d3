"""Argument checks that fail early with the offending value in the message."""

from __future__ import annotations

from collections.abc import Sequence

import torch
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


def check_same_device(generator: torch.Generator, tensor: Tensor) -> None:
    """Raise ``ValueError`` unless ``generator`` draws on ``tensor``'s device (no silent copies)."""
    if _canonical(generator.device) != _canonical(tensor.device):
        raise ValueError(
            f"the generator is on {generator.device} but the data on {tensor.device}; "
            f"create it with torch.Generator(device={str(tensor.device)!r})"
        )


def _canonical(device: torch.device | str) -> torch.device:
    """``device`` with its index filled in (``cuda`` -> ``cuda:<current>``)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device
