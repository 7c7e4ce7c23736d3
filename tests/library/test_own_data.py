"""Bring your own data: ImageClasses from labelled tensors, any map-style dataset or a folder
tree, with classes of different sizes, and episodes drawn from them."""

import numpy as np
import pytest
import torch
from PIL import Image

from msr.data import ImageClasses, sample_episodes


def _numbered(sizes):
    """Images whose pixel value is (label * 100 + index within the class), labels shuffled."""
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    index = torch.cat([torch.arange(n) for n in sizes])
    images = (labels * 100 + index).float().view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
    order = torch.randperm(labels.numel())
    return images[order].contiguous(), labels[order]


def test_uneven_classes_give_episodes_of_one_class_per_label():
    sizes = (3, 9, 5, 2, 7)
    images, labels = _numbered(sizes)
    classes = ImageClasses.from_labelled(images, labels, names=list("abcde"))
    assert classes.sizes.tolist() == list(sizes) and classes.names == tuple("abcde")
    assert "5 classes, 2-9 images each" in repr(classes)
    with pytest.raises(ValueError, match="classes differ in size"):
        classes.images  # noqa: B018 - the 5-D view exists only for equal sizes
    tasks = sample_episodes(classes, 50, 3, 1, 2, torch.Generator().manual_seed(0))
    drawn = set()
    for t in range(50):
        for label in range(3):
            members = torch.cat(
                [tasks.x_support[t][tasks.y_support[t] == label],
                 tasks.x_query[t][tasks.y_query[t] == label]]
            )[:, 0, 0, 0]  # fmt: skip
            owner = (members // 100).unique()
            assert owner.numel() == 1 and members.unique().numel() == 3  # one class, distinct
            assert (members % 100 < sizes[int(owner)]).all()  # only real images of that class
            drawn.add(int(owner))
    assert drawn == {0, 1, 2, 4}  # class 3 has 2 images, fewer than shots + queries = 3
    with pytest.raises(ValueError, match="only 2 of 5 classes have that many images"):
        sample_episodes(classes, 1, 3, 2, 4, torch.Generator())


def test_even_classes_sample_as_the_five_dimensional_form():
    images, labels = _numbered((4, 4, 4))
    flat = ImageClasses.from_labelled(images, labels)
    grouped = ImageClasses(flat.images, flat.names)
    assert torch.equal(flat.images[1, :, 0, 0, 0].sort().values, torch.arange(100.0, 104.0))
    a = sample_episodes(flat, 3, 2, 1, 2, torch.Generator().manual_seed(4))
    b = sample_episodes(grouped, 3, 2, 1, 2, torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


class _UserDataset(torch.utils.data.Dataset):
    """A user's dataset: PIL images, uint8 arrays or float tensors, with int labels."""

    def __init__(self, kind):
        self.kind, self.labels = kind, [0, 1, 1, 2, 0, 1]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        pixels = np.full((6, 5), 17 * index, dtype=np.uint8)
        if self.kind == "pil":
            return Image.fromarray(pixels).convert("RGB"), self.labels[index]
        if self.kind == "array":
            return pixels, torch.tensor(self.labels[index])
        return torch.from_numpy(pixels).float().div(255).unsqueeze(0), self.labels[index]


@pytest.mark.parametrize("kind, channels", [("pil", 3), ("array", 1), ("tensor", 1)])
def test_classes_from_any_map_style_dataset(kind, channels):
    classes = ImageClasses.from_dataset(_UserDataset(kind))
    assert classes.sizes.tolist() == [2, 3, 1] and classes.image_shape == (channels, 6, 5)
    assert classes.names == ("0", "1", "2")
    first_of_class_1 = classes.flat[classes.starts[1], 0, 0, 0]
    assert first_of_class_1.item() == pytest.approx(17 / 255)  # item 1: scaled to [0, 1]


def test_dataset_errors_name_the_problem():
    class Mixed(_UserDataset):
        def __getitem__(self, index):
            image, label = super().__getitem__(index)
            return (image[:, :3] if index == 2 else image), label

    with pytest.raises(ValueError, match="images of different shapes"):
        ImageClasses.from_dataset(Mixed("tensor"))
    with pytest.raises(ValueError, match="the dataset is empty"):
        ImageClasses.from_dataset([])
    with pytest.raises(ValueError, match=r"labels must be 0\.\.2 with none missing: \[1\]"):
        ImageClasses.from_labelled(torch.zeros(2, 1, 2, 2), torch.tensor([0, 2]))


def test_classes_from_an_image_folder_tree(tmp_path):
    sizes = {"cat": 3, "dog": 1, "emu": 2}
    for name, count in sizes.items():
        (tmp_path / name).mkdir()
        for i in range(count):
            Image.fromarray(np.full((9, 9), 40 * i, dtype=np.uint8)).save(
                tmp_path / name / f"{i}.png"
            )
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    classes = ImageClasses.from_folder(tmp_path, image_size=4, mode="L")
    assert classes.names == ("cat", "dog", "emu") and classes.sizes.tolist() == [3, 1, 2]
    assert classes.image_shape == (1, 4, 4)
    (tmp_path / "fox").mkdir()
    with pytest.raises(ValueError, match="fox holds no"):
        ImageClasses.from_folder(tmp_path, image_size=4)
    with pytest.raises(FileNotFoundError, match="has no class folders"):
        ImageClasses.from_folder(tmp_path / "missing", image_size=4)
