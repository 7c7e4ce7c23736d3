"""How well a learned sharing matrix U recovers a known symmetry: scores of span(U).

Compare spans, never entries: U v = (U R)(R^-1 v) for any invertible R, so only span(U) is
identifiable. ``B`` is the true sharing basis (e.g. ``msr.bases.conv1d``). How symmetric the
network adapted from U is, whatever its span: ``msr.equivariance``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from msr.layers import MSRConv2d


def orthonormal_basis(matrix: Tensor, rtol: float = 1e-6) -> Tensor:
    """Orthonormal basis (columns) of the column span of ``matrix``, via SVD in float64."""
    if matrix.dim() != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(matrix.shape)}")
    left, singular, _ = torch.linalg.svd(matrix.detach().double(), full_matrices=False)
    if singular.numel() == 0 or singular[0] == 0:
        raise ValueError("the matrix is zero: its span is empty")
    return left[:, singular > rtol * singular[0]]


def principal_angles(U: Tensor, B: Tensor) -> Tensor:
    """Principal angles (degrees, ascending) between span(U) and span(B)."""
    if U.shape[0] != B.shape[0]:
        raise ValueError(f"U and B must have the same rows, got {U.shape[0]} and {B.shape[0]}")
    cosines = torch.linalg.svdvals(orthonormal_basis(U).T @ orthonormal_basis(B))
    return torch.rad2deg(torch.arccos(cosines.clamp(-1.0, 1.0))).flip(0)


def subspace_recall(U: Tensor, B: Tensor) -> float:
    """Share of span(B) inside span(U): ||orth(U)^T orth(B)||_F^2 / rank(B), in [0, 1]."""
    basis_b = orthonormal_basis(B)
    overlap = orthonormal_basis(U).T @ basis_b
    return float(overlap.pow(2).sum() / basis_b.shape[1])


def energy_share(U: Tensor, B: Tensor) -> float:
    """Share of U's squared Frobenius norm inside span(B): ||P_B U||_F^2 / ||U||_F^2."""
    basis_b = orthonormal_basis(B)
    u = U.detach().double()
    return float((basis_b.T @ u).pow(2).sum() / u.pow(2).sum())


def effective_basis(U: Tensor, rtol: float = 0.1) -> Tensor:
    """Orthonormal basis of the strong directions of span(U): the left singular vectors whose
    singular value is at least ``rtol`` times the largest. A MAML inner step moves W by
    U U^T g, so with the default a dropped direction moves W under 1% as far as the strongest."""
    if not 0 < rtol <= 1:
        raise ValueError(f"rtol must be in (0, 1], got {rtol}")
    left, singular, _ = torch.linalg.svd(U.detach().double(), full_matrices=False)
    if singular.numel() == 0 or singular[0] == 0:
        raise ValueError("the matrix is zero: its span is empty")
    return left[:, singular >= rtol * singular[0]]


def grassmann_distance(U: Tensor, B: Tensor) -> float:
    """Distance in degrees between span(U) and span(B), also of different dimensions:
    sqrt(sum of squared principal angles + 90^2 * |dim U - dim B|) (Ye & Lim, 2016)."""
    angles = principal_angles(U, B)
    mismatch = abs(orthonormal_basis(U).shape[1] - orthonormal_basis(B).shape[1])
    return float((angles.square().sum() + 90.0**2 * mismatch).sqrt())


def kernel_mode_matrix(U: Tensor, kernel_numel: int) -> Tensor:
    """U of a conv kernel (numel, latent), rearranged to (kernel pixels, everything else): its
    left singular vectors are the filter directions U uses, whatever the channel sharing. For
    U = U_out (x) U_in (x) U_kernel its singular values are U_kernel's times ||U_out|| ||U_in||."""
    if U.shape[0] % kernel_numel:
        raise ValueError(f"U has {U.shape[0]} rows, not a multiple of {kernel_numel} pixels")
    u = U.detach().double()
    return u.view(-1, kernel_numel, u.shape[1]).transpose(0, 1).reshape(kernel_numel, -1)


def recovery_scores(U: Tensor, B: Tensor) -> dict[str, float]:
    """How well span(U) recovers the true basis B: the largest principal angle (degrees), the
    recall (``subspace_recall``) and the recall a random span of U's width would get by chance
    (latent / numel)."""
    return {
        "max_principal_angle_deg": float(principal_angles(U, B).max()),
        "recall": subspace_recall(U, B),
        "chance_recall": U.shape[1] / U.shape[0],
    }


def nearest_group(
    U: Tensor, candidates: Mapping[str, Tensor], discovered_energy: float = 0.9
) -> dict[str, Any]:
    """Which symmetry U found: the candidate basis (name -> basis) nearest by
    ``grassmann_distance`` to U's strong directions (``effective_basis``), and whether it is
    *discovered*: it also holds ``discovered_energy`` of U's energy (``energy_share``)."""
    if not candidates:
        raise ValueError("no candidate bases to compare U with")
    strongest = effective_basis(U)
    distances = {name: grassmann_distance(strongest, b) for name, b in candidates.items()}
    nearest = min(distances, key=distances.__getitem__)
    energy = energy_share(U, candidates[nearest])
    return {
        "effective_rank": strongest.shape[1],
        "group_distances_deg": distances,
        "nearest_group": nearest,
        "energy_in_nearest_group": energy,
        "discovered_group": nearest if energy >= discovered_energy else None,
    }


def factor_singular_values(model: nn.Module) -> dict[str, dict[str, list[float]]]:
    """The singular values (descending) of every Kronecker factor (U_out, U_in, U_kernel) of
    each ``MSRConv2d`` in ``model``, by layer name: how far each learned factor is from the
    identity it started at, and which directions it keeps."""
    return {
        name: {
            factor: torch.linalg.svdvals(getattr(layer, factor).detach().double()).tolist()
            for factor in ("U_out", "U_in", "U_kernel")
        }
        for name, layer in model.named_modules()
        if isinstance(layer, MSRConv2d) and layer.kronecker
    }
