"""Random streams keyed by (seed, index): the same draws whatever ran before, on any device.

A task pool draws task ``index`` from its own stream, and a training loop draws step ``index``'s
episodes from its own, so nothing but the seed needs saving to repeat or resume a run. The CPU's
and CUDA's generators differ, so a key gives one stream per device type.
"""

from __future__ import annotations

import torch


def keyed_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded from (``seed``, ``index``), distinct for distinct keys."""
    return torch.Generator(device=device).manual_seed(
        (seed * 1_000_003 + index) * 2_654_435_761 % (2**63 - 1)
    )
