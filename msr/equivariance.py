"""How symmetric a network is: equivariance errors of a layer, and probes of the networks a
learner adapts to each task (1-D translations, group actions on the pixel grid, the image
transforms of the few-shot augmentation). Scores of span(U) itself: ``msr.recovery``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from msr.episodic import TaskBatch
    from msr.groups import Group


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
