"""The planar symmetry groups C_N (N rotations) and D_N (N rotations and reflections).

Conventions are e2cnn's, so that bases built here match the paper's data: element
``f * N + r`` is r^r f^f (reflect first, then rotate by 2 pi r / N counter-clockwise), acting on
points (x, y) with x to the right and y *up*; the reflection is across the line at angle
``axis`` (e2cnn's default pi/2: the vertical axis, x -> -x). Only elements that map the square
pixel grid onto itself (multiples of 90 degrees, and reflections across the axes or diagonals)
act on images, as exact pixel permutations (no interpolation); the other elements act on
continuous filters (``msr.bases.steerable_lifting2d``).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from msr.validation import check_positive_int


@dataclass(frozen=True, eq=False)
class Group:
    """C_N (``reflections=False``) or D_N: see the module docstring for the element order."""

    name: str
    rotations: int
    reflections: bool
    axis: float = math.pi / 2

    def __post_init__(self) -> None:
        check_positive_int("rotations", self.rotations)

    @property
    def order(self) -> int:
        return self.rotations * (2 if self.reflections else 1)

    def element(self, g: int) -> tuple[int, int]:
        """Element ``g`` as (reflection 0/1, rotation steps r): g = r^r f^flip."""
        if not 0 <= g < self.order:
            raise ValueError(f"{self.name} has elements 0..{self.order - 1}, got {g}")
        return divmod(g, self.rotations)

    @cached_property
    def matrices(self) -> Tensor:
        """(order, 2, 2) float64: the action of each element on (x, y-up) points."""
        twice_axis = 2 * self.axis
        reflection = torch.tensor(
            [
                [math.cos(twice_axis), math.sin(twice_axis)],
                [math.sin(twice_axis), -math.cos(twice_axis)],
            ],
            dtype=torch.float64,
            device="cpu",  # cached tables stay on the CPU, whatever the default device
        )
        matrices = []
        for g in range(self.order):
            flip, steps = self.element(g)
            angle = 2 * math.pi * steps / self.rotations
            rotation = torch.tensor(
                [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]],
                dtype=torch.float64,
                device="cpu",
            )
            matrices.append(rotation @ reflection if flip else rotation)
        return torch.stack(matrices)

    @cached_property
    def cayley(self) -> Tensor:
        """``cayley[g, h]`` is the index of the product g h."""
        table = torch.empty(self.order, self.order, dtype=torch.long, device="cpu")
        for g in range(self.order):
            flip_g, steps_g = self.element(g)
            for h in range(self.order):
                flip_h, steps_h = self.element(h)
                # r^a f^b r^c f^d = r^(a + (-1)^b c) f^(b + d)
                steps = (steps_g + (-1) ** flip_g * steps_h) % self.rotations
                table[g, h] = ((flip_g + flip_h) % 2) * self.rotations + steps
        return table

    @cached_property
    def inverse(self) -> Tensor:
        """``inverse[g]`` is the index of g^-1."""
        return (self.cayley == 0).int().argmax(dim=1)

    @cached_property
    def grid_elements(self) -> tuple[int, ...]:
        """The elements that map the square pixel grid onto itself (integer matrices)."""
        integral = (self.matrices - self.matrices.round()).abs().flatten(1).amax(1) < 1e-9
        return tuple(int(g) for g in integral.nonzero().flatten())

    def transform(self, x: Tensor, g: int) -> Tensor:
        """Apply element ``g`` to the last two (square, equal) dimensions: (g x)(p) = x(g^-1 p).

        Exact (a pixel permutation); only for ``grid_elements``.
        """
        if g not in self.grid_elements:
            self.element(g)  # names an out-of-range index
            raise ValueError(
                f"element {g} of {self.name} does not map the pixel grid onto itself; "
                f"only {list(self.grid_elements)} act exactly on images"
            )
        matrix = self.matrices[g].round().long()
        source = _pixel_permutation(matrix, x.shape[-2:]).to(x.device)
        return x.flatten(-2)[..., source].unflatten(-1, x.shape[-2:])

    def act_regular(self, y: Tensor, g: int) -> Tensor:
        """Act with ``g`` on regular feature maps of shape (..., F * order, H, W).

        Channel ``f * order + h`` is the response to filter f transformed by element h; the action
        moves it spatially and permutes the group axis: (g y)[f, h] = g . y[f, g^-1 h].
        """
        channels = y.shape[-3]
        if channels % self.order:
            raise ValueError(
                f"regular feature maps need a multiple of {self.order} channels, got {channels}"
            )
        grouped = y.unflatten(-3, (channels // self.order, self.order))
        source = self.cayley[self.inverse[g]].to(y.device)  # h -> g^-1 h
        return self.transform(grouped[..., source, :, :], g).flatten(-4, -3)


def _pixel_permutation(matrix: Tensor, shape: torch.Size) -> Tensor:
    """Flat source index for each flat target pixel under (g x)(p) = x(g^-1 p)."""
    height, width = shape
    if height != width:
        raise ValueError(f"grid group actions need square images, got {height}x{width}")
    # Doubled centred coordinates stay integral for even and odd sizes alike; y points up.
    coords = torch.arange(height, device="cpu") * 2 - (height - 1)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    points = torch.stack([cols.flatten(), -rows.flatten()])  # (x, y) per pixel
    inverse = torch.round(torch.linalg.inv(matrix.double())).long()
    src_x, src_y = inverse @ points
    return ((height - 1 - src_y) // 2) * width + (src_x + width - 1) // 2


def get_group(name: str) -> Group:
    """Look up a group by name: ``"cN"`` (N rotations) or ``"dN"`` (and reflections), any case."""
    match = re.fullmatch(r"([cd])([1-9][0-9]*)", str(name).lower())
    if match is None:
        raise ValueError(
            f"unknown group {name!r}; expected 'cN' (N rotations) or 'dN' (N rotations and "
            "reflections), e.g. 'c4', 'd8'"
        )
    kind, rotations = match.groups()
    return _group(kind == "d", int(rotations))


@functools.cache
def _group(reflections: bool, rotations: int) -> Group:
    return Group(f"{'D' if reflections else 'C'}{rotations}", rotations, reflections)


C4 = get_group("c4")
D4 = get_group("d4")
