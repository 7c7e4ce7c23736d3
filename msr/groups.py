"""The exact 90-degree symmetry groups of a square pixel grid: C4 (rotations) and D4 (+ flips).

Each element is a 2x2 integer matrix acting on centred pixel coordinates, so composition is a
matrix product and every action on pixels is an exact permutation (no interpolation).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

_ROT90 = torch.tensor([[0, -1], [1, 0]])
_FLIP = torch.tensor([[1, 0], [0, -1]])


@dataclass(frozen=True, eq=False)
class Group:
    """A finite group of 2x2 integer matrices acting on square images about their centre."""

    name: str
    matrices: Tensor  # (order, 2, 2) int64; element 0 is the identity

    @property
    def order(self) -> int:
        return self.matrices.shape[0]

    def index(self, matrix: Tensor) -> int:
        """Position of ``matrix`` in the element list."""
        hits = (self.matrices == matrix).flatten(1).all(1).nonzero()
        if hits.numel() != 1:
            raise ValueError(f"matrix {matrix.tolist()} is not an element of {self.name}")
        return int(hits[0])

    @cached_property
    def cayley(self) -> Tensor:
        """``cayley[g, h]`` is the index of the product g h."""
        table = torch.empty(self.order, self.order, dtype=torch.long)
        for g in range(self.order):
            for h in range(self.order):
                table[g, h] = self.index(self.matrices[g] @ self.matrices[h])
        return table

    @cached_property
    def inverse(self) -> Tensor:
        """``inverse[g]`` is the index of g^-1."""
        return (self.cayley == 0).int().argmax(dim=1)

    def transform(self, x: Tensor, g: int) -> Tensor:
        """Apply element ``g`` to the last two (square, equal) dimensions: (g x)(p) = x(g^-1 p)."""
        return x.flatten(-2)[..., _pixel_permutation(self.matrices[g], x.shape[-2:])].unflatten(
            -1, x.shape[-2:]
        )

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
        source = self.cayley[self.inverse[g]]  # h -> g^-1 h
        return self.transform(grouped[..., source, :, :], g).flatten(-4, -3)


def _pixel_permutation(matrix: Tensor, shape: torch.Size) -> Tensor:
    """Flat source index for each flat target pixel under (g x)(p) = x(g^-1 p)."""
    height, width = shape
    if height != width:
        raise ValueError(f"90-degree group actions need square images, got {height}x{width}")
    # Doubled centred coordinates stay integral for even and odd sizes alike.
    coords = torch.arange(height) * 2 - (height - 1)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    points = torch.stack([cols.flatten(), rows.flatten()])  # (x, y) per pixel
    inverse = torch.round(torch.linalg.inv(matrix.double())).long()
    src_x, src_y = inverse @ points
    return ((src_y + height - 1) // 2) * width + (src_x + width - 1) // 2


def _generate(name: str, generators: list[Tensor]) -> Group:
    elements = [torch.eye(2, dtype=torch.long)]
    frontier = list(elements)
    while frontier:
        new = []
        for a in frontier:
            for gen in generators:
                product = gen @ a
                if not any(torch.equal(product, e) for e in elements):
                    elements.append(product)
                    new.append(product)
        frontier = new
    return Group(name, torch.stack(elements))


C4 = _generate("C4", [_ROT90])
D4 = _generate("D4", [_ROT90, _FLIP])
GROUPS = {"c4": C4, "d4": D4}


def get_group(name: str) -> Group:
    """Look up a group by name (``"c4"`` or ``"d4"``, any case)."""
    try:
        return GROUPS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown group {name!r}; expected one of {sorted(GROUPS)}") from None
