"""Few-shot data on real Omniglot files and a generated mini-ImageNet tree."""

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURE_NPZ, FIXTURE_OMNIGLOT
from PIL import Image

from msr.data import augment_images, load_miniimagenet, load_omniglot, sample_episodes
from msr.data.episodes import ImageClasses

NPZ = FIXTURE_NPZ
ZIPS = FIXTURE_OMNIGLOT / "zips"  # real drawings of 3 background and 1 evaluation characters


def _extract_characters(tmp_path: Path, members: int) -> Path:
    """The first ``members`` characters of the standard background zip, as folders."""
    root = tmp_path / "omniglot"
    with zipfile.ZipFile(ZIPS / "images_background.zip") as archive:
        names = sorted(n for n in archive.namelist() if n.endswith(".png"))
        wanted = sorted({n.rsplit("/", 1)[0] for n in names})[:members]
        for name in names:
            if name.rsplit("/", 1)[0] in wanted:
                archive.extract(name, root)
    return root


@pytest.mark.full_data
def test_npz_splits_have_the_documented_sizes(full_omniglot):
    npz = full_omniglot / "omniglot_28x28_lanczos.npz"
    background = load_omniglot(npz, "background")
    assert background.images.shape == (964, 20, 1, 28, 28)
    assert load_omniglot(npz, "evaluation").num_classes == 659
    train = load_omniglot(npz, "vinyals-train")
    assert train.num_classes == 4112 and train.names[1] == "Angelic/character01/rot090"
    assert load_omniglot(npz, "vinyals-test").num_classes == 1692


def test_the_fixture_splits_hold_real_rotated_characters():
    train = load_omniglot(NPZ, "vinyals-train")
    assert train.num_classes == 48 and train.names[1].endswith("/rot090")
    # ink = 1 on a mostly empty page; rotated classes are exact quarter turns
    assert train.images.min() >= 0.0 and train.images.max() <= 1.0
    assert train.images.mean() < 0.3
    assert torch.equal(train.images[1], torch.rot90(train.images[0], 1, dims=(-2, -1)))


def test_folder_layout_matches_the_npz(tmp_path):
    root = _extract_characters(tmp_path, members=3)
    classes = load_omniglot(root, "background")
    assert classes.names == (
        "Alphabet_of_the_Magi/character01",
        "Alphabet_of_the_Magi/character02",
        "Alphabet_of_the_Magi/character03",
    )
    npz = load_omniglot(NPZ, "background")
    index = npz.names.index("Alphabet_of_the_Magi/character01")
    # same pixels as the npz (both LANCZOS 105 -> 28, up to 8-bit rounding of the npz)
    assert (classes.images[0] - npz.images[index]).abs().max() < 1.5 / 255
    with pytest.raises(ValueError, match=r"character .* of the vinyals-train"):
        load_omniglot(root, "vinyals-train", splits_dir=FIXTURE_OMNIGLOT / "splits" / "vinyals")
    with pytest.raises(ValueError, match="holds no evaluation characters"):
        load_omniglot(root, "evaluation")


def test_missing_and_corrupt_omniglot_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.npz"):
        load_omniglot(tmp_path / "nope.npz")
    with pytest.raises(FileNotFoundError, match="neither"):
        load_omniglot(tmp_path / "missing-folder")
    with pytest.raises(FileNotFoundError, match=r"splits/vinyals/train.txt"):
        load_omniglot(_extract_characters(tmp_path, 1), "vinyals-train")
    broken = tmp_path / "broken" / "images_background" / "Greek" / "character01"
    broken.mkdir(parents=True)
    (broken / "0001_01.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read image .*0001_01\.png"):
        load_omniglot(tmp_path / "broken", "background")
    bad_npz = tmp_path / "bad.npz"
    np.savez(bad_npz, images=np.zeros((1, 20, 28, 28), np.uint8))
    with pytest.raises(ValueError, match=r"bad.npz lacks the arrays \['alphabet_index'"):
        load_omniglot(bad_npz)
    torn = tmp_path / "torn.npz"
    torn.write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(ValueError, match=r"cannot read .*torn\.npz"):
        load_omniglot(torn)
    with pytest.raises(ValueError, match="image_size=84 needs the standard folders"):
        load_omniglot(NPZ, image_size=84)
    with pytest.raises(ValueError, match="unknown split 'train'"):
        load_omniglot(NPZ, "train")


def _mini_imagenet_tree(root: Path, classes: int = 3, per_class: int = 4) -> Path:
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        lines = ["filename,label"]
        for c in range(classes):
            label = f"n{split}{c:04d}"
            for i in range(per_class):
                name = f"{label}{i:08d}.jpg"
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / "images" / name)
                lines.append(f"{name},{label}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root


def test_mini_imagenet_layout(tmp_path):
    root = _mini_imagenet_tree(tmp_path / "mini")
    classes = load_miniimagenet(root, "val", image_size=16)
    assert classes.images.shape == (3, 4, 3, 16, 16)
    assert classes.names == ("nval0000", "nval0001", "nval0002")
    assert classes.images.min() >= 0 and classes.images.max() <= 1
    assert load_miniimagenet(root, "test", image_size=8, max_per_class=2).images.shape[1] == 2
    (root / "images" / "ntrain000000000001.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"ntrain000000000001\.jpg"):
        load_miniimagenet(root, "train", image_size=8)
    (root / "images" / "ntest000100000000.jpg").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=r"cannot read image .*ntest000100000000\.jpg"):
        load_miniimagenet(root, "test", image_size=8)
    (root / "val.csv").write_text("file,class\na.jpg,x\n")
    with pytest.raises(ValueError, match="header 'filename,label'"):
        load_miniimagenet(root, "val")
    with pytest.raises(FileNotFoundError, match=r"mini/nothing/train\.csv"):
        load_miniimagenet(tmp_path / "mini" / "nothing")


def test_episodes_are_seeded_disjoint_and_labelled():
    images = torch.arange(6 * 5, dtype=torch.float32).view(6, 5, 1, 1, 1).expand(6, 5, 1, 2, 2)
    classes = ImageClasses(images.contiguous(), tuple("abcdef"))
    tasks = sample_episodes(
        classes, 4, ways=3, shots=2, queries=3, generator=torch.Generator().manual_seed(1)
    )
    again = sample_episodes(classes, 4, 3, 2, 3, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(tasks, again, strict=True))
    assert tasks.x_support.shape == (4, 6, 1, 2, 2) and tasks.x_query.shape == (4, 9, 1, 2, 2)
    for t in range(4):
        ids = torch.cat([tasks.x_support[t, :, 0, 0, 0], tasks.x_query[t, :, 0, 0, 0]])
        assert ids.unique().numel() == 15  # no image is both support and query
        for label in range(3):  # each label is one class
            members = torch.cat(
                [
                    tasks.x_support[t][tasks.y_support[t] == label],
                    tasks.x_query[t][tasks.y_query[t] == label],
                ]
            )[:, 0, 0, 0]
            assert (members // 5).unique().numel() == 1
    with pytest.raises(ValueError, match="ways=7 exceeds the 6 classes"):
        sample_episodes(classes, 1, 7, 1, 1, torch.Generator())
    with pytest.raises(ValueError, match="shots \\+ queries = 6 exceeds the 5 images"):
        sample_episodes(classes, 1, 2, 3, 3, torch.Generator())


def test_augmentation_changes_query_only_and_keeps_identity_exact():
    images = torch.rand(6, 1, 12, 12)
    same = augment_images(images, torch.Generator(), scale=(1.0, 1.0), max_degrees=0.0, flips=False)
    torch.testing.assert_close(same, images, atol=1e-5, rtol=0)
    moved = augment_images(images, torch.Generator().manual_seed(0))
    assert moved.shape == images.shape and not torch.allclose(moved, images)
    classes = ImageClasses(torch.rand(3, 4, 1, 8, 8), ("a", "b", "c"))
    plain = sample_episodes(classes, 2, 2, 1, 2, torch.Generator().manual_seed(5))
    augmented = sample_episodes(
        classes, 2, 2, 1, 2, torch.Generator().manual_seed(5), augment_images
    )
    assert torch.equal(plain.x_support, augmented.x_support)
    assert not torch.allclose(plain.x_query, augmented.x_query)
    with pytest.raises(ValueError, match="scale must satisfy"):
        augment_images(images, torch.Generator(), scale=(0.5, 1.2))
