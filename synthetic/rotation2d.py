"""2-D regression tasks equivariant to rotations (C_N) or rotations and flips (D_N) (MSR Table 2).

Every task is a lifting group convolution of a 32x32 single-channel input x ~ N(0, I): a kernel
W = B w in a group-convolution basis B, with w drawn per task, gives ``filters * |G|`` output
channels; y = conv2d(x, W) ('valid') is 30x30. Two families of B:

- ``Steerable2D`` (the paper's data, C8 / D8): e2cnn's band-limited steerable basis
  (``msr.bases.steerable_lifting2d``), 3 regular fields of 3x3 kernels, 18 coefficients drawn
  with e2cnn's init (output variance 0.625 for C8, 0.5625 for D8). Rotations by 45 degrees act
  on the continuous filters; the 90-degree subgroup acts exactly on the pixel grid.
- ``ExactGrid2D`` (the exact-grid variant, C4 / D4): 3 free 3x3 filters ~ N(0, 1/9), each copied
  exactly at every group element on the pixel grid (``msr.bases.group_conv2d``); no band limit.

The paper stored ~18 GB of tasks; here tasks stream from (seed, index) through ``TaskPool``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from msr import bases
from msr.groups import Group, get_group
from msr.recovery import energy_share, kernel_mode_matrix, nearest_group, principal_angles
from msr.validation import check_positive_int
from synthetic.pool import TaskPool

CANDIDATE_GROUPS = ("c4", "d4", "c8", "d8")  # "which symmetry was discovered"
DISCOVERED_ENERGY = 0.9  # the nearest group counts as discovered with this share of U's energy


@dataclass(frozen=True)
class LiftingConvTasks(TaskPool):
    """Base of the 2-D data sets: tasks W = basis @ (coefficient_std * N(0, I))."""

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

    @property
    def basis(self) -> Tensor:
        """The sharing basis of the data: (out_channels * k * k, latent)."""
        raise NotImplementedError

    @property
    def coefficient_std(self) -> Tensor:
        """Standard deviation of each coefficient of ``basis``: (latent,)."""
        raise NotImplementedError

    def group_basis(self, group_name: str) -> Tensor | None:
        """This family's basis for another group on the same output channels (regular fields
        in that group's element order), or None where the family has none: its order does not
        divide the channel count, or (exact grid) it does not map the pixel grid onto itself.
        Used to ask which group a learned U is nearest to."""
        raise NotImplementedError

    def recovery_scores(self, U: Tensor) -> dict[str, Any]:
        """How far a learned U (``sharing_matrix()``) recovered this data's group convolution
        (docs/results.md, Table 2): its energy in the data's basis and principal angle to it, its
        filter directions (``kernel_mode_matrix``) and their energy in the band limit, and which
        symmetry was discovered: the group among ``CANDIDATE_GROUPS`` (those whose regular
        fields fit the channels) whose lifting basis of this family (``group_basis``) is nearest
        to U's strong directions by Grassmann distance, counted if it also holds
        ``DISCOVERED_ENERGY`` of U's energy."""
        numel, pixels, rank = U.shape[0], self.kernel_size**2, self.basis.shape[1]
        band_limited = bases.steerable_lifting2d(
            self.group_name, 1, self.kernel_size, device=U.device
        ).filter_basis
        kernel_mode = kernel_mode_matrix(U, pixels)
        kernel_singular = torch.linalg.svdvals(kernel_mode)
        candidates = {
            name: basis
            for name in CANDIDATE_GROUPS
            if (basis := self.group_basis(name)) is not None
        }
        return {
            "energy_in_group_basis": energy_share(U, self.basis),
            "chance_energy": rank / numel,
            # span(U) must be narrower than the weight space for the angle to say anything
            "max_principal_angle_deg": (
                float(principal_angles(U, self.basis).max()) if U.shape[1] < numel else None
            ),
            "kernel_singular_values": (kernel_singular / kernel_singular[0]).tolist(),
            "kernel_energy_in_band_limit": energy_share(kernel_mode, band_limited),
            "chance_kernel_energy": band_limited.shape[1] / pixels,
            **nearest_group(U, candidates, DISCOVERED_ENERGY),
        }

    def weights(self, coefficients: Tensor) -> Tensor:
        """Conv kernels (..., out_channels, 1, k, k) for coefficients (..., latent)."""
        k = self.kernel_size
        return (coefficients @ self.basis.T).unflatten(-1, (self.out_channels, 1, k, k))

    def draw(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        latent, device, size = self.basis.shape[1], generator.device, self.image_size
        coefficients = torch.randn(latent, generator=generator, device=device)
        coefficients = coefficients * self.coefficient_std
        x = torch.randn(self.examples_per_task, 1, size, size, generator=generator, device=device)
        return x, coefficients

    def targets(self, x: Tensor, coefficients: Tensor) -> Tensor:
        """Targets of a task batch: x (T, E, 1, H, W) -> (T, E, C, H', W').

        One conv per task: measured 3-4x faster than a single grouped conv over the batch
        (32 tasks: 13-18 vs 50 ms on one thread).
        """
        kernels = self.weights(coefficients)
        return torch.stack([F.conv2d(inputs, k) for inputs, k in zip(x, kernels, strict=True)])


@dataclass(frozen=True)
class ExactGrid2D(LiftingConvTasks):
    """The exact-grid variant: free filters copied at each element of C4 or D4 (see above)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.group.grid_elements) != self.group.order:
            raise ValueError(
                f"the exact-grid data needs a group that maps the pixel grid onto itself (c4, "
                f"d4), got {self.group_name!r}; Steerable2D makes C_N / D_N data for any N"
            )

    @cached_property
    def basis(self) -> Tensor:
        return bases.group_conv2d(
            self.group_name, 1, self.filters, self.kernel_size, device=self.device
        )

    @cached_property
    def coefficient_std(self) -> Tensor:
        return torch.full((self.basis.shape[1],), 1.0 / self.kernel_size, device=self.device)

    def group_basis(self, group_name: str) -> Tensor | None:
        group = get_group(group_name)
        if self.out_channels % group.order or len(group.grid_elements) != group.order:
            return None
        fields = self.out_channels // group.order
        return bases.group_conv2d(group_name, 1, fields, self.kernel_size, device=self.device)


@dataclass(frozen=True)
class Steerable2D(LiftingConvTasks):
    """The paper's data: band-limited steerable filters of C_N or D_N (see above)."""

    group_name: str = "c8"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size}")

    @cached_property
    def steerable(self) -> bases.SteerableBasis:
        return bases.steerable_lifting2d(
            self.group_name, self.filters, self.kernel_size, device=self.device
        )

    @property
    def basis(self) -> Tensor:
        return self.steerable.basis

    @property
    def coefficient_std(self) -> Tensor:
        return self.steerable.coefficient_std

    def group_basis(self, group_name: str) -> Tensor | None:
        order = get_group(group_name).order
        if self.out_channels % order:
            return None
        fields = self.out_channels // order
        return bases.steerable_lifting2d(
            group_name, fields, self.kernel_size, device=self.device
        ).basis


def __getattr__(name: str) -> type[ExactGrid2D]:
    """``Rotation2D``, the old name of ``ExactGrid2D`` (it does flips too), still imports."""
    if name == "Rotation2D":
        warnings.warn(
            "synthetic.rotation2d.Rotation2D is now ExactGrid2D (C4 / D4 on the exact pixel "
            "grid, flips included); the old name will be removed",
            DeprecationWarning,
            stacklevel=2,
        )
        return ExactGrid2D
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
