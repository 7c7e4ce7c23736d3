"""Omniglot (Lake et al. 2015) from an offline copy: the 28x28 ``.npz`` or the standard folders.

Sources: the ``omniglot_28x28_lanczos.npz`` array file, or a directory holding the standard
layout ``images_background/<Alphabet>/characterNN/*.png`` and/or ``images_evaluation/...``.
Splits: ``background`` / ``evaluation`` (the official 30 / 20 alphabets) and the Vinyals et al.
(2016) ``vinyals-train|val|test|trainval`` character lists, in which each character at each
rotation (0, 90, 180, 270 degrees) is its own class. Images are returned with ink = 1.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from msr.data.episodes import ImageClasses
from msr.data.images import read_image, unit_pixels
from msr.data.locations import find_data, where_searched

OMNIGLOT_SPLITS = (
    "background",
    "evaluation",
    "vinyals-train",
    "vinyals-val",
    "vinyals-test",
    "vinyals-trainval",
)
NPZ_KEYS = ("images", "alphabet_index", "character_in_alphabet", "split", "alphabet_names")
OFFICIAL_FOLDERS = ("images_background", "images_evaluation")
ARRAY_PATH = "omniglot/omniglot_28x28_lanczos.npz"  # under a data root (msr.data.locations)
GET_IT = "python -m msr.data.omniglot download (or: convert DIR, for the zips you have)"


def find_omniglot(extra_roots: Sequence[Path] = ()) -> Path:
    """The Omniglot array file found by the data rule (``msr.data.locations``: ``$MSR_DATA``,
    the cache folder, then ``extra_roots``); a ``FileNotFoundError`` saying where it looked and
    the command that gets the data."""
    found = find_data(ARRAY_PATH, extra_roots)
    if found is None:
        raise FileNotFoundError(
            f"no Omniglot data in {where_searched(ARRAY_PATH, extra_roots)}: get it with "
            f"{GET_IT}, or set MSR_DATA to the folder that holds omniglot/"
        )
    return found


def load_omniglot(
    path: str | Path,
    split: str = "vinyals-train",
    image_size: int = 28,
    splits_dir: str | Path | None = None,
) -> ImageClasses:
    """Load one split of Omniglot from ``path`` (the ``.npz`` file or a standard-layout folder).

    ``splits_dir`` holds the Vinyals lists (``train.txt`` ...); by default ``splits/vinyals``
    beside the ``.npz`` file or inside the folder.
    """
    if split not in OMNIGLOT_SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {OMNIGLOT_SPLITS}")
    path = Path(path)
    if path.suffix == ".npz":
        characters = _npz_characters(path, image_size)
        default_splits = path.parent / "splits" / "vinyals"
    elif path.is_dir():
        characters = _folder_characters(path, image_size)
        default_splits = path / "splits" / "vinyals"
    else:
        raise FileNotFoundError(
            f"{path} is neither an Omniglot .npz file nor a folder with {OFFICIAL_FOLDERS}"
        )
    if split in ("background", "evaluation"):
        keys = [k for k, (s, _) in characters.items() if s == split]
        if not keys:
            raise ValueError(f"{path} holds no {split} characters")
        return ImageClasses(torch.stack([characters[k][1] for k in keys]), tuple(keys))
    lines = _read_split_list(Path(splits_dir) if splits_dir else default_splits, split)
    images, names = [], []
    for line in lines:
        key, rotation = line.rsplit("/", 1)
        if key not in characters:
            raise ValueError(f"character {key} of the {split} list is missing from {path}")
        quarter_turns = int(rotation.removeprefix("rot")) // 90
        images.append(torch.rot90(characters[key][1], quarter_turns, dims=(-2, -1)))
        names.append(line)
    return ImageClasses(torch.stack(images), tuple(names))


def _read_split_list(folder: Path, split: str) -> list[str]:
    file = folder / f"{split.removeprefix('vinyals-')}.txt"
    if not file.is_file():
        raise FileNotFoundError(f"Vinyals split list not found: {file}")
    lines = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    bad = [line for line in lines if not line.rsplit("/", 1)[-1].startswith("rot")]
    if bad:
        raise ValueError(f"{file}: lines must end in /rotDDD, e.g. {bad[0]!r}")
    return lines


def _npz_characters(path: Path, image_size: int) -> dict[str, tuple[str, Tensor]]:
    """key 'Alphabet/characterNN' -> (split, (20, 1, 28, 28) ink-is-one images)."""
    if image_size != 28:
        raise ValueError(
            f"the .npz holds 28x28 images; image_size={image_size} needs the standard folders"
        )
    if not path.is_file():
        raise FileNotFoundError(f"Omniglot array file not found: {path}")
    try:
        data = np.load(path)
        missing = [key for key in NPZ_KEYS if key not in data.files]
        if missing:
            raise ValueError(f"{path} lacks the arrays {missing}")
        arrays = {key: data[key] for key in NPZ_KEYS}
    except (OSError, zipfile.BadZipFile, EOFError) as error:
        raise ValueError(f"cannot read {path}: {error}") from error
    except ValueError as error:
        if "allow_pickle" not in str(error):
            raise ValueError(f"cannot read {path}: {error}") from None
        raise ValueError(
            f"{path} holds pickled Python objects, which are never loaded (they could run "
            "code): not an Omniglot array file"
        ) from None
    _check_npz(path, arrays)
    pixels = unit_pixels(arrays["images"], f"{path}: images")  # stored with ink = 0
    images = 1.0 - torch.from_numpy(pixels).unsqueeze(2)
    names = arrays["alphabet_names"]
    return {
        f"{names[a]}/character{c:02d}": (("background", "evaluation")[s], images[i])
        for i, (a, c, s) in enumerate(
            zip(
                arrays["alphabet_index"],
                arrays["character_in_alphabet"],
                arrays["split"],
                strict=True,
            )
        )
    }


def _check_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Refuse an .npz whose arrays do not fit together (a ``ValueError`` naming the array):
    images (characters, drawings, 28, 28) and one in-range index per character."""
    images = arrays["images"]
    if images.ndim != 4 or images.shape[2:] != (28, 28) or 0 in images.shape:
        raise ValueError(
            f"{path}: images has shape {images.shape}, not (characters, drawings, 28, 28)"
        )
    bounds = {  # the values each per-character index may take, [low, high)
        "alphabet_index": (0, len(arrays["alphabet_names"])),
        "character_in_alphabet": (1, None),
        "split": (0, 2),
    }
    for key, (low, high) in bounds.items():
        index = arrays[key]
        if index.shape != images.shape[:1] or not np.issubdtype(index.dtype, np.integer):
            raise ValueError(
                f"{path}: {key} must hold one integer per character ({images.shape[0]}), "
                f"got shape {index.shape} of {index.dtype}"
            )
        if index.min() < low or (high is not None and index.max() >= high):
            allowed = f"{low} .. {high - 1}" if high is not None else f"{low} or more"
            raise ValueError(f"{path}: {key} holds values outside {allowed}")
    rows = zip(
        arrays["alphabet_index"].tolist(), arrays["character_in_alphabet"].tolist(), strict=True
    )
    if len(set(rows)) != images.shape[0]:
        raise ValueError(f"{path}: two rows name the same alphabet and character")


def _folder_characters(root: Path, image_size: int) -> dict[str, tuple[str, Tensor]]:
    characters = {}
    folders = [root / name for name in OFFICIAL_FOLDERS if (root / name).is_dir()]
    if not folders:
        raise FileNotFoundError(f"{root} has neither of {OFFICIAL_FOLDERS}")
    for folder in folders:
        split = folder.name.removeprefix("images_")
        for character in sorted(p for p in folder.glob("*/*") if p.is_dir()):
            files = sorted(character.glob("*.png"))
            if not files:
                raise ValueError(f"no .png drawings in {character}")
            drawings = torch.stack([1.0 - read_image(f, "L", image_size) for f in files])
            characters[f"{character.parent.name}/{character.name}"] = (split, drawings)
    counts = {len(d) for _, d in characters.values()}
    if len(counts) != 1:
        raise ValueError(f"characters in {root} have differing numbers of drawings: {counts}")
    return characters
