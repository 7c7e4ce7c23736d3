"""mini-ImageNet (Vinyals et al. 2016; Ravi & Larochelle split) from the standard layout.

``root/images/<file>.jpg`` and ``root/{train,val,test}.csv`` with the header ``filename,label``
(64 / 16 / 20 classes of 600 images). Images are resized to ``image_size`` (84 by default).
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from msr.data.episodes import ImageClasses
from msr.data.images import read_image
from msr.validation import check_positive_int

MINIIMAGENET_SPLITS = ("train", "val", "test")


def load_miniimagenet(
    root: str | Path, split: str = "train", image_size: int = 84, max_per_class: int | None = None
) -> ImageClasses:
    """Load one split; ``max_per_class`` keeps only the first images of each class (faster)."""
    if split not in MINIIMAGENET_SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {MINIIMAGENET_SPLITS}")
    check_positive_int("image_size", image_size)
    if max_per_class is not None:
        check_positive_int("max_per_class", max_per_class)
    root = Path(root)
    table = root / f"{split}.csv"
    if not table.is_file():
        raise FileNotFoundError(f"mini-ImageNet split file not found: {table}")
    by_label: dict[str, list[str]] = {}
    with table.open(newline="") as stream:
        reader = csv.DictReader(stream)
        if reader.fieldnames is None or not {"filename", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{table} must have the header 'filename,label'")
        for row in reader:
            by_label.setdefault(row["label"], []).append(row["filename"])
    if not by_label:
        raise ValueError(f"{table} lists no images")
    counts = {len(files) for files in by_label.values()}
    per_class = min(counts) if max_per_class is None else min(min(counts), max_per_class)
    if max_per_class is None and len(counts) != 1:
        raise ValueError(f"{table}: classes have differing image counts {sorted(counts)}")
    images = torch.stack(
        [
            torch.stack(
                [read_image(root / "images" / f, "RGB", image_size) for f in files[:per_class]]
            )
            for files in by_label.values()
        ]
    )
    return ImageClasses(images, tuple(by_label))
