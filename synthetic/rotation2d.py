"""2-D regression tasks equivariant to rotations (C4) or rotations and flips (D4) (MSR Table 2).

Every task is a lifting group convolution: ``filters`` free 3x3 kernels, each copied once per
group element (rotated / flipped exactly on the pixel grid), give ``filters * |G|`` output
channels; y = conv2d(x, W) ('valid'), so 32x32 single-channel inputs give 30x30 outputs. The
free weights are drawn per task ~ N(0, 1/k^2) (output variance about 1); inputs x ~ N(0, I).
The original paper used C8 / D8 through e2cnn and stored ~18 GB; the exact 90-degree groups are
used here instead, so that equivariance holds to float precision, and tasks stream from a
``TaskPool``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor

from msr import bases
from msr.groups import Group, get_group
from msr.validation import check_positive_int
from synthetic.pool import TaskPool


@dataclass(frozen=True)
class Rotation2D(TaskPool):
    """A data set of C4- or D4-equivariant convolution tasks; see the module docstring."""

    group_name: str = "c4"
    filters: int = 3
    image_size: int = 32
    kernel_size: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        get_group(self.group_name)
        check_positive_int("filters", self.filters)
        check_positive_int("kernel_size", self.kernel_size)
        check_positive_int("image_size", self.image_size)
        if self.kernel_size > self.image_size:
            raise ValueError(f"kernel_size={self.kernel_size} > image_size={self.image_size}")

    @property
    def group(self) -> Group:
        return get_group(self.group_name)

    @property
    def out_channels(self) -> int:
        return self.filters * self.group.order

    @cached_property
    def basis(self) -> Tensor:
        """The group-convolution sharing basis: (out * k * k, filters * k * k)."""
        return bases.group_conv2d(self.group_name, 1, self.filters, self.kernel_size)

    def weights(self, coefficients: Tensor) -> Tensor:
        """Conv kernels (..., out_channels, 1, k, k) for free weights (..., filters * k * k)."""
        k = self.kernel_size
        return (coefficients @ self.basis.T).unflatten(-1, (self.out_channels, 1, k, k))

    def draw(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        latent = self.basis.shape[1]
        coefficients = torch.randn(latent, generator=generator) / self.kernel_size
        size = self.image_size
        x = torch.randn(self.examples_per_task, 1, size, size, generator=generator)
        return x, coefficients

    def targets(self, x: Tensor, coefficients: Tensor) -> Tensor:
        """Targets of a task batch by one grouped conv: x (T, E, 1, H, W) -> (T, E, C, H', W')."""
        tasks = x.shape[0]
        kernels = self.weights(coefficients).flatten(0, 1)  # (T * C, 1, k, k)
        stacked = x.transpose(0, 1).flatten(1, 2)  # (E, T, H, W): tasks become channel groups
        y = F.conv2d(stacked, kernels, groups=tasks)  # (E, T * C, H', W')
        return y.unflatten(1, (tasks, self.out_channels)).transpose(0, 1)
