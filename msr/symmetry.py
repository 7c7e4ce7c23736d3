"""Scores of how well a learned sharing matrix U recovers a known symmetry.

Compare spans, never entries: U v = (U R)(R^-1 v) for any invertible R, so only span(U) is
identifiable. ``B`` is the true sharing basis (e.g. ``msr.bases.conv1d``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msr.layers import MSRConv2d

if TYPE_CHECKING:
    from msr.episodic import TaskBatch
    from msr.groups import Group


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


def equivariance_error(moved_input: Tensor, moved_output: Tensor) -> float:
    """RMS(a - b) / (RMS(a) + RMS(b)) for a = f(g x), b = g f(x): ~1e-7 is exact, 1 is unrelated."""
    if moved_input.shape != moved_output.shape:
        raise ValueError(
            f"shapes differ: {tuple(moved_input.shape)} vs {tuple(moved_output.shape)}"
        )
    a, b = moved_input.detach().double(), moved_output.detach().double()
    denominator = _rms(a) + _rms(b)
    return 0.0 if denominator == 0 else float(_rms(a - b) / denominator)


def _rms(t: Tensor) -> Tensor:
    return t.pow(2).mean().sqrt()


def translation_equivariance_error(
    weight: Tensor, shift: int = 1, samples: int = 256, seed: int = 0
) -> float:
    """Equivariance error of a 1-D 'valid' layer y = W x (W: out x in) under a shift of the input.

    A convolution satisfies (W x')[p] = (W x)[p - shift] for x' = x shifted right by ``shift``,
    at every output position where both sides are defined; W is scored there on random inputs.
    """
    out_length, in_length = weight.shape
    if not 0 < shift < out_length:
        raise ValueError(f"shift must be in [1, {out_length - 1}], got {shift}")
    generator = torch.Generator(device="cpu").manual_seed(seed)  # the same inputs on any device
    x = torch.randn(samples, in_length, generator=generator, dtype=torch.float64, device="cpu")
    x = x.to(weight.device)
    w = weight.detach().double()
    shifted = torch.roll(x, shift, dims=1)
    return equivariance_error((shifted @ w.T)[:, shift:], (x @ w.T)[:, : out_length - shift])


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


def adapted_translation_equivariance_error(
    adapt: Callable[[Tensor, Tensor], nn.Module], tasks: TaskBatch, count: int = 8
) -> float:
    """Mean ``translation_equivariance_error`` of the weight that ``adapt(x, y)`` (e.g.
    ``MAML.adapted_model``) gives on the support sets of the first ``count`` tasks: the
    symmetry the whole adapted layer has, not only span(U)."""
    tasks_scored = range(min(count, tasks.num_tasks))
    weights = [adapt(tasks.x_support[i], tasks.y_support[i]).weight for i in tasks_scored]
    return float(sum(translation_equivariance_error(w) for w in weights) / len(weights))


def adapted_group_equivariance_error(
    adapt: Callable[[Tensor, Tensor], nn.Module], tasks: TaskBatch, group: Group, count: int = 8
) -> float:
    """Mean ``equivariance_error`` of the network ``adapt(x, y)`` gives on each of the first
    ``count`` tasks, on its query inputs, under every non-identity element of ``group`` that
    acts exactly on the pixel grid (a lifting layer: input transformed, regular output fields
    permuted and transformed)."""
    errors = []
    for index in range(min(count, tasks.num_tasks)):
        network = adapt(tasks.x_support[index], tasks.y_support[index])
        x = tasks.x_query[index]
        with torch.no_grad():
            out = network(x)
            errors += [
                equivariance_error(network(group.transform(x, g)), group.act_regular(out, g))
                for g in group.grid_elements[1:]
            ]
    return sum(errors) / len(errors)


# The transformations of the few-shot query augmentation, each one fixed element.
IMAGE_TRANSFORMS = ("h-flip", "v-flip", "rot90", "rot+30", "rot-30")


def transform_images(x: Tensor, name: str) -> Tensor:
    """One of ``IMAGE_TRANSFORMS`` applied to images or feature maps (..., H, W): the flips and
    the quarter turn permute pixels exactly; the ±30° turns resample bilinearly about the
    centre (zeros outside), as the augmentation does."""
    if name == "h-flip":
        return x.flip(-1)
    if name == "v-flip":
        return x.flip(-2)
    if name == "rot90":
        return x.rot90(1, (-2, -1))
    if name not in ("rot+30", "rot-30"):
        raise ValueError(f"unknown transform {name!r}; expected one of {IMAGE_TRANSFORMS}")
    angle = math.radians(30.0 if name == "rot+30" else -30.0)
    flat = x.reshape(-1, 1, *x.shape[-2:])
    theta = torch.tensor(
        [[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0]],
        dtype=x.dtype,
        device=x.device,
    ).expand(flat.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(flat.shape), align_corners=False)
    moved = F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return moved.reshape(x.shape)


def image_symmetry_errors(
    network: nn.Sequential, classify: Callable[[Tensor], Tensor], x: Tensor, transform: str
) -> dict[str, Any]:
    """How far ``network`` is from commuting with ``transform`` on the images ``x``: per conv
    block (the output of each ``nn.MaxPool2d``), ``equivariance_error(f(T x), T f(x))``; for the
    class scores ``classify(x)``, the invariance error ``equivariance_error(c(T x), c(x))`` and
    the share of images whose predicted class ``T`` leaves unchanged."""
    moved = transform_images(x, transform)
    blocks, h, h_moved = [], x, moved
    with torch.no_grad():
        for module in network:
            h, h_moved = module(h), module(h_moved)
            if isinstance(module, nn.MaxPool2d):
                blocks.append(equivariance_error(h_moved, transform_images(h, transform)))
        scores, moved_scores = classify(x), classify(moved)
    return {
        "blocks": blocks,
        "logits": equivariance_error(moved_scores, scores),
        "agreement": float((scores.argmax(-1) == moved_scores.argmax(-1)).double().mean()),
    }


def adapted_image_symmetry(
    adapt: Callable[[Tensor, Tensor], tuple[nn.Sequential, Callable[[Tensor], Tensor]]],
    tasks: TaskBatch,
    transforms: Sequence[str] = IMAGE_TRANSFORMS,
) -> dict[str, dict[str, Any]]:
    """``image_symmetry_errors`` of the network each task adapts to, on its query images, per
    transform, averaged over ``tasks``. ``adapt(x_support, y_support)`` gives (the adapted
    network, its classifier of query images): e.g. ``maml.adapted_model`` and the network
    itself, or a ProtoNet's encoder and its prototype classifier."""
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in transforms}
    for index in range(tasks.num_tasks):
        network, classify = adapt(tasks.x_support[index], tasks.y_support[index])
        for name in transforms:
            rows[name].append(image_symmetry_errors(network, classify, tasks.x_query[index], name))
    return {
        name: {
            "blocks": [
                sum(col) / len(col) for col in zip(*(r["blocks"] for r in found), strict=True)
            ],
            "logits": sum(r["logits"] for r in found) / len(found),
            "agreement": sum(r["agreement"] for r in found) / len(found),
        }
        for name, found in rows.items()
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
