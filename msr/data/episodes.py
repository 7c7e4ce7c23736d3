"""Labelled image classes (even or uneven in size) and seeded N-way K-shot episode sampling."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from msr.data.images import read_image, unit_pixels
from msr.episodic import TaskBatch
from msr.validation import check_positive_int, check_same_device


class ImageClasses:
    """Images grouped by class, floats (ideally in [0, 1]).

    ``ImageClasses(images, names)`` takes a (classes, per_class, C, H, W) tensor (every class
    the same size, as the Omniglot and mini-ImageNet loaders give); ``from_labelled``,
    ``from_dataset`` and ``from_folder`` take classes of any sizes. Stored flat: class c's
    images are ``flat[starts[c] : starts[c] + sizes[c]]``.
    """

    def __init__(self, images: Tensor, names: Sequence[str]) -> None:
        if images.dim() != 5:
            raise ValueError(
                f"images must be (classes, per_class, C, H, W), got {tuple(images.shape)}; "
                "classes of different sizes: ImageClasses.from_labelled(images, labels)"
            )
        sizes = torch.full((images.shape[0],), images.shape[1], device="cpu")
        self._set(images.flatten(0, 1), sizes, names)

    def _set(self, flat: Tensor, sizes: Tensor, names: Sequence[str]) -> None:
        """``sizes`` on the host; a copy goes beside the images."""
        if len(names) != sizes.numel():
            raise ValueError(f"{len(names)} names for {sizes.numel()} classes")
        if sizes.numel() == 0 or flat.dim() != 4:
            raise ValueError(
                f"need at least one class of (C, H, W) images, got {tuple(flat.shape)}"
            )
        self._host_sizes = sizes.long()  # read on the host: sampling makes no device sync
        self.flat, self.sizes, self.names = flat, self._host_sizes.to(flat.device), tuple(names)
        self.starts = torch.cumsum(self.sizes, 0) - self.sizes
        self._eligible: dict[int, Tensor] = {}

    def eligible(self, needed: int) -> Tensor:
        """The classes with at least ``needed`` images (on the images' device; cached)."""
        if needed not in self._eligible:
            indices = (self._host_sizes >= needed).nonzero().flatten()
            self._eligible[needed] = indices.to(self.flat.device)
        return self._eligible[needed]

    @classmethod
    def from_labelled(
        cls, images: Tensor, labels: Tensor, names: Sequence[str] | None = None
    ) -> ImageClasses:
        """Classes from (N, C, H, W) images and their integer labels 0..classes-1 (any order,
        any number per class, every class present); ``names`` default to the label numbers."""
        labels = torch.as_tensor(labels).long().flatten()
        if images.dim() != 4 or labels.numel() != images.shape[0]:
            raise ValueError(
                f"need (N, C, H, W) images and N labels, got {tuple(images.shape)} and "
                f"{labels.numel()} labels"
            )
        if labels.numel() == 0 or labels.min() < 0:
            raise ValueError("labels must be non-negative integers, one per image")
        sizes = torch.bincount(labels.cpu())
        if (sizes == 0).any():
            missing = (sizes == 0).nonzero().flatten().tolist()
            raise ValueError(f"labels must be 0..{sizes.numel() - 1} with none missing: {missing}")
        order = torch.argsort(labels.cpu(), stable=True).to(images.device)
        names = tuple(names) if names is not None else tuple(map(str, range(sizes.numel())))
        classes = cls.__new__(cls)
        classes._set(images[order], sizes, names)
        return classes

    @classmethod
    def from_dataset(cls, dataset: Any, names: Sequence[str] | None = None) -> ImageClasses:
        """Classes from a map-style dataset (``len`` and ``[i]``, e.g. a ``torch.utils.data
        .Dataset``) of (image, label): the image a (C, H, W) tensor, an (H, W) or (H, W, C)
        array or a PIL image (integer pixels scaled to [0, 1]); the label an int 0..classes-1.
        Every image must have the same shape (resize them in the dataset's transform)."""
        images, labels = [], []
        for index in range(len(dataset)):
            image, label = dataset[index]
            images.append(_as_chw(image, index))
            labels.append(int(label))
        if not images:
            raise ValueError("the dataset is empty")
        shapes = {tuple(image.shape) for image in images}
        if len(shapes) != 1:
            raise ValueError(f"images of different shapes {sorted(shapes)}: resize them first")
        return cls.from_labelled(torch.stack(images), torch.tensor(labels), names)

    @classmethod
    def from_folder(cls, root: str | Path, image_size: int, mode: str = "RGB") -> ImageClasses:
        """Classes from a folder tree ``root/<class name>/<image>`` (.png, .jpg, .jpeg, .bmp),
        any number of images per class, each resized to image_size x image_size in PIL
        ``mode`` ('RGB' or 'L'); classes in sorted order of their folder names."""
        root = Path(root)
        check_positive_int("image_size", image_size)
        folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        if not folders:
            raise FileNotFoundError(f"{root} has no class folders (root/<class>/<image>)")
        images, labels = [], []
        for label, folder in enumerate(folders):
            files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise ValueError(f"class folder {folder} holds no {'/'.join(IMAGE_SUFFIXES)} files")
            images += [read_image(f, mode, image_size) for f in files]
            labels += [label] * len(files)
        return cls.from_labelled(
            torch.stack(images), torch.tensor(labels), [f.name for f in folders]
        )

    @property
    def num_classes(self) -> int:
        return self.sizes.numel()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        return tuple(self.flat.shape[1:])  # type: ignore[return-value]

    @property
    def images(self) -> Tensor:
        """(classes, per_class, C, H, W) when every class has the same size."""
        if (self._host_sizes != self._host_sizes[0]).any():
            raise ValueError("classes differ in size: use .flat, .sizes and .starts")
        return self.flat.view(self.num_classes, -1, *self.image_shape)

    def to(self, device: torch.device | str) -> ImageClasses:
        """The same classes with their images on ``device`` (moved once, sampled there)."""
        moved = type(self).__new__(type(self))
        moved._set(self.flat.to(device), self._host_sizes, self.names)
        return moved

    def __repr__(self) -> str:
        low, high = int(self._host_sizes.min()), int(self._host_sizes.max())
        per_class = str(low) if low == high else f"{low}-{high}"
        return (
            f"ImageClasses({self.num_classes} classes, {per_class} images each, "
            f"{'x'.join(map(str, self.image_shape))}, {self.flat.device})"
        )


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def _as_chw(image: Any, index: int) -> Tensor:
    """One dataset image as a float (C, H, W) tensor in [0, 1] (``unit_pixels``' rule)."""
    if isinstance(image, Tensor):
        if image.dim() not in (2, 3):
            raise ValueError(
                f"dataset item {index}: expected a (C, H, W) image, got {tuple(image.shape)}"
            )
        pixels = unit_pixels(image.detach().cpu().numpy(), f"dataset item {index}")
        tensor = torch.from_numpy(pixels)
        return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor
    array = np.asarray(image)  # PIL images and arrays: (H, W) or (H, W, C)
    if array.ndim not in (2, 3):
        raise ValueError(f"dataset item {index}: expected an (H, W[, C]) image, got {array.shape}")
    tensor = torch.from_numpy(unit_pixels(array, f"dataset item {index}"))
    return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1).contiguous()


def check_episodes(classes: ImageClasses, ways: int, shots: int, queries: int) -> Tensor:
    """The classes episodes of this shape can draw from; a ValueError if there are fewer than
    ``ways`` of them (so a run can check its episode shape before it starts training)."""
    for name, value in (("ways", ways), ("shots", shots), ("queries", queries)):
        check_positive_int(name, value)
    total_classes, needed = classes.num_classes, shots + queries
    if ways > total_classes:
        raise ValueError(f"ways={ways} exceeds the {total_classes} classes available")
    eligible = classes.eligible(needed)
    if eligible.numel() < ways:
        per_class = int(classes._host_sizes.max())
        even = bool((classes._host_sizes == per_class).all())
        raise ValueError(
            f"shots + queries = {needed} exceeds the {per_class} images per class"
            if even
            else f"shots + queries = {needed}: only {eligible.numel()} of {total_classes} "
            f"classes have that many images, fewer than ways={ways}"
        )
    return eligible


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

    Only classes with at least ``shots + queries`` images take part. ``augment_query`` (e.g.
    ``augment_images``) transforms the query images only, as in Aug-Omniglot /
    Aug-MiniImageNet. Every draw comes from ``generator``, which must live on the images'
    device: episodes are then drawn, gathered and augmented there, with no copy.
    """
    check_positive_int("num_tasks", num_tasks)
    eligible = check_episodes(classes, ways, shots, queries)
    check_same_device(generator, classes.flat)
    device = classes.flat.device
    needed, per_class = shots + queries, int(classes._host_sizes.max())
    chosen = eligible[
        torch.stack(
            [
                torch.randperm(eligible.numel(), generator=generator, device=device)[:ways]
                for _ in range(num_tasks)
            ]
        )
    ]  # (T, ways)
    sizes = classes.sizes[chosen]
    if per_class <= DENSE_DRAW_LIMIT * needed:
        picks = _dense_picks(sizes, per_class, needed, generator)
    else:
        picks = _sparse_picks(sizes, needed, generator)  # (T, ways, shots + queries)
    images = classes.flat[classes.starts[chosen].unsqueeze(-1) + picks]  # (T, ways, S+Q, C, H, W)
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


# A draw ranks random keys over every image slot when the largest class holds at most this many
# times the images an episode needs per class (Omniglot: 20 vs 6 or 16); otherwise it picks the
# images directly, at O(needed^2) per class whatever the class sizes. Both are uniform; the
# first keeps the episodes the earlier releases drew (and the Table 3 figures measured on them).
DENSE_DRAW_LIMIT = 4


def _dense_picks(sizes: Tensor, per_class: int, needed: int, generator: torch.Generator) -> Tensor:
    """``needed`` distinct positions below each ``sizes`` entry, in random order: the first
    ``needed`` of a random ranking of all ``per_class`` slots (the slots past a class's size
    ranked last)."""
    keys = torch.rand(*sizes.shape, per_class, generator=generator, device=sizes.device)
    positions = torch.arange(per_class, device=sizes.device)
    keys = keys.masked_fill(positions >= sizes.unsqueeze(-1), 2.0)  # never drawn
    return keys.argsort(-1)[..., :needed]


def _sparse_picks(sizes: Tensor, needed: int, generator: torch.Generator) -> Tensor:
    """The same distribution as ``_dense_picks`` at O(needed^2) per class: Floyd's algorithm
    draws a uniform ``needed``-subset of 0..size-1 (for j = size-needed .. size-1, take a
    uniform t in 0..j, or j itself if t is taken already), then a random order shuffles it."""
    device = sizes.device
    picks = torch.empty(*sizes.shape, needed, dtype=torch.long, device=device)
    uniform = torch.rand(
        *sizes.shape, needed, generator=generator, device=device, dtype=torch.float64
    )
    for i in range(needed):
        top = sizes - needed + i  # j: t is drawn from 0..j
        t = (uniform[..., i] * (top + 1)).floor().long().minimum(top)
        taken = (picks[..., :i] == t.unsqueeze(-1)).any(-1)
        picks[..., i] = torch.where(taken, top, t)
    order = torch.rand(*sizes.shape, needed, generator=generator, device=device).argsort(-1)
    return picks.gather(-1, order)
