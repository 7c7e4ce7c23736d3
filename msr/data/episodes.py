"""Labelled image classes and seeded N-way K-shot episode sampling."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from msr.episodic import TaskBatch
from msr.validation import check_positive_int, check_same_device


@dataclass(frozen=True)
class ImageClasses:
    """Images grouped by class: ``images`` (classes, per_class, C, H, W) floats in [0, 1]."""

    images: Tensor
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dim() != 5:
            raise ValueError(
                f"images must be (classes, per_class, C, H, W), got {tuple(self.images.shape)}"
            )
        if len(self.names) != self.images.shape[0]:
            raise ValueError(f"{len(self.names)} names for {self.images.shape[0]} classes")

    @property
    def num_classes(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str) -> ImageClasses:
        """The same classes with their images on ``device`` (moved once, sampled there)."""
        return ImageClasses(self.images.to(device), self.names)


def sample_episodes(
    classes: ImageClasses,
    num_tasks: int,
    ways: int,
    shots: int,
    queries: int,
    generator: torch.Generator,
    augment_query: Callable[[Tensor, torch.Generator], Tensor] | None = None,
) -> TaskBatch:
    """``num_tasks`` episodes: ``ways`` random classes, ``shots`` support and ``queries`` query
    images per class (distinct images), labels 0..ways-1 in random order.

    ``augment_query`` (e.g. ``augment_images``) transforms the query images only, as in
    Aug-Omniglot / Aug-MiniImageNet. Every draw comes from ``generator``, which must live on
    the images' device: episodes are then drawn, gathered and augmented there, with no copy.
    """
    for name, value in (
        ("num_tasks", num_tasks),
        ("ways", ways),
        ("shots", shots),
        ("queries", queries),
    ):
        check_positive_int(name, value)
    check_same_device(generator, classes.images)
    device = classes.images.device
    total_classes, per_class = classes.images.shape[:2]
    if ways > total_classes:
        raise ValueError(f"ways={ways} exceeds the {total_classes} classes available")
    if shots + queries > per_class:
        raise ValueError(
            f"shots + queries = {shots + queries} exceeds the {per_class} images per class"
        )
    chosen = torch.stack(
        [
            torch.randperm(total_classes, generator=generator, device=device)[:ways]
            for _ in range(num_tasks)
        ]
    )  # (T, ways)
    picks = torch.rand(num_tasks, ways, per_class, generator=generator, device=device).argsort(-1)
    picks = picks[..., : shots + queries]  # (T, ways, shots + queries), distinct per class
    images = classes.images[chosen.unsqueeze(-1), picks]  # (T, ways, S+Q, C, H, W)
    labels = torch.arange(ways, device=device).view(1, ways, 1)

    def flatten(part: Tensor) -> Tensor:
        return part.flatten(1, 2)

    x_support = flatten(images[:, :, :shots])
    x_query = flatten(images[:, :, shots:])
    y_support = flatten(labels.expand(num_tasks, ways, shots))
    y_query = flatten(labels.expand(num_tasks, ways, queries))
    if augment_query is not None:
        x_query = augment_query(x_query.flatten(0, 1), generator).view_as(x_query)
    return TaskBatch(x_support, y_support, x_query, y_query)
