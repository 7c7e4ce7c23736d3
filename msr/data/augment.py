"""The Aug-Omniglot / Aug-MiniImageNet query augmentation, in one batched affine resampling."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from msr.validation import check_same_device


def augment_images(
    images: Tensor,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.8, 1.0),
    max_degrees: float = 30.0,
    flips: bool = True,
) -> Tensor:
    """Random resized crop (area ``scale``, square), horizontal and vertical flips (p = 0.5
    each) and a rotation in [-max_degrees, max_degrees], per image of a (N, C, H, W) batch.

    All four are one affine map per image, resampled bilinearly (zeros outside the image).
    Every draw comes from ``generator``, which must live on the images' device.
    """
    if images.dim() != 4:
        raise ValueError(f"expected images (N, C, H, W), got {tuple(images.shape)}")
    check_same_device(generator, images)
    low, high = scale
    if not 0 < low <= high <= 1:
        raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
    count = images.shape[0]

    def uniform(lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(count, generator=generator, device=images.device)

    side = uniform(low, high).sqrt()  # crop side as a fraction of the image side
    centre_x = (1 - side) * uniform(-1.0, 1.0)  # crop stays inside the image
    centre_y = (1 - side) * uniform(-1.0, 1.0)
    angle = uniform(-max_degrees, max_degrees) * math.pi / 180
    flip_x = flip_y = torch.ones(count, device=images.device)
    if flips:
        flip_x = torch.where(uniform(0.0, 1.0) < 0.5, -1.0, 1.0)
        flip_y = torch.where(uniform(0.0, 1.0) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # output coords -> input coords: rotate, flip, then scale into the crop and move to its centre
    theta = torch.stack(
        [
            torch.stack([side * cos * flip_x, -side * sin * flip_y, centre_x], dim=1),
            torch.stack([side * sin * flip_x, side * cos * flip_y, centre_y], dim=1),
        ],
        dim=1,
    ).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
