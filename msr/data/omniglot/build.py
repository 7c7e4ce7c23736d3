"""Making the Omniglot array file the loaders read: from the original authors' zips (downloaded
or already on disk) or their unzipped folders, verified against a known SHA-256.

The conversion: each 105x105 drawing (PNG mode '1') to 8-bit grey ('L', 0 / 255), resized to
28x28 with PIL's LANCZOS filter; characters in the order of their global id (the ``IIII`` of
``IIII_DD.png``: background 1-964, evaluation 965-1623), drawings in drawer order; 255 = paper,
0 = ink (the loader inverts). Written atomically as ``omniglot_28x28_lanczos.npz`` with the
Vinyals et al. split lists (shipped with this package) beside it.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from msr._files import write_atomically

ARRAY_FILE = "omniglot_28x28_lanczos.npz"
ZIPS = ("images_background.zip", "images_evaluation.zip")
SOURCE = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
# content_sha256 of the arrays converted from the original zips (all 1623 characters)
ARRAYS_SHA256 = "6912ee45851021c2bcb2776f870f8da6da1f7e749bed25a5ff8d7f093a463395"
PACKAGED = Path(__file__).resolve().parent  # the split lists and the data's licence
SPLIT_FILES = ("train.txt", "val.txt", "test.txt")


class OmniglotDataError(Exception):
    """The data could not be fetched or made; the message says how to place it by hand."""


def by_hand(folder: Path) -> str:
    """How to get the data without this command's download."""
    urls = " and ".join(SOURCE + name for name in ZIPS)
    return (
        f"download {urls} yourself (a browser, or a machine with network), put both zips in a "
        f"folder and run: python -m msr.data.omniglot convert FOLDER --root {folder.parent}"
    )


def content_sha256(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 of what the loaders read: the images' bytes and every character's alphabet,
    index in its alphabet and split (as int64, so the stored integer types do not matter)."""
    digest = hashlib.sha256(np.ascontiguousarray(arrays["images"], np.uint8).tobytes())
    for key in ("alphabet_index", "character_in_alphabet", "split"):
        digest.update(np.asarray(arrays[key], np.int64).tobytes())
    digest.update("\n".join(map(str, arrays["alphabet_names"])).encode())
    return digest.hexdigest()


def _drawings(source: Path) -> Iterator[tuple[str, bytes]]:
    """(path inside the standard layout, PNG bytes) of every drawing under ``source``: a folder
    holding the two zips, the zips' folders (``images_background/...``), or one zip."""
    zips = [source] if source.is_file() else [source / n for n in ZIPS if (source / n).is_file()]
    folders = [] if source.is_file() else [source / n.removesuffix(".zip") for n in ZIPS]
    folders = [f for f in folders if f.is_dir()]
    if not zips and not folders:
        raise OmniglotDataError(
            f"{source} holds neither {' nor '.join(ZIPS)} nor their folders images_background/, "
            "images_evaluation/"
        )
    for archive in zips:
        try:
            with zipfile.ZipFile(archive) as opened:
                for name in sorted(opened.namelist()):
                    if name.endswith(".png"):
                        yield name, opened.read(name)
        except (zipfile.BadZipFile, OSError) as error:
            raise OmniglotDataError(f"cannot read {archive}: {error}") from None
    for folder in folders:
        for path in sorted(folder.glob("*/*/*.png")):
            yield path.relative_to(folder.parent).as_posix(), path.read_bytes()


def convert_arrays(source: Path) -> dict[str, np.ndarray]:
    """The arrays of ``ARRAY_FILE`` from the drawings under ``source`` (see ``_drawings``)."""
    characters: dict[int, dict] = {}
    for name, data in _drawings(source):
        parts = name.split("/")
        if len(parts) != 4 or not parts[2].startswith("character"):
            raise OmniglotDataError(f"{source}: {name} is not <split>/<alphabet>/characterNN/x.png")
        folder, alphabet, character, file = parts
        identity, _, drawer = file.removesuffix(".png").partition("_")
        with Image.open(io.BytesIO(data)) as image:
            small = image.convert("L").resize((28, 28), Image.Resampling.LANCZOS)
        entry = characters.setdefault(
            int(identity),
            {"alphabet": alphabet, "number": int(character[9:]), "split": folder, "drawings": {}},
        )
        entry["drawings"][int(drawer)] = np.asarray(small, np.uint8)
    if not characters:
        raise OmniglotDataError(f"{source} holds no drawings")
    order = sorted(characters)
    counts = {len(characters[i]["drawings"]) for i in order}
    if len(counts) != 1:
        raise OmniglotDataError(f"{source}: characters have differing numbers of drawings {counts}")
    alphabets = list(dict.fromkeys(characters[i]["alphabet"] for i in order))  # in id order
    return {
        "images": np.stack(
            [np.stack([d for _, d in sorted(characters[i]["drawings"].items())]) for i in order]
        ),
        "char_id": np.array(order, np.int16),
        "alphabet_index": np.array(
            [alphabets.index(characters[i]["alphabet"]) for i in order], np.int16
        ),
        "character_in_alphabet": np.array([characters[i]["number"] for i in order], np.int16),
        "split": np.array([characters[i]["split"] == "images_evaluation" for i in order], np.int8),
        "alphabet_names": np.array(alphabets),
    }


def convert(source: str | Path, root: str | Path, expected: str | None = ARRAYS_SHA256) -> Path:
    """Convert the drawings under ``source`` into ``root/omniglot/`` (the array file, the split
    lists and the data's licence); the arrays must hash to ``expected`` (``content_sha256``;
    None: not checked, for a subset of your own). Returns the array file."""
    source, folder = Path(source), Path(root) / "omniglot"
    arrays = convert_arrays(source)
    if expected is not None and (found := content_sha256(arrays)) != expected:
        raise OmniglotDataError(
            f"the images converted from {source} do not match the reference Omniglot (SHA-256 "
            f"{found[:12]}... for {expected[:12]}...: other or incomplete files); "
            + by_hand(folder)
        )
    lists = folder / "splits" / "vinyals"
    lists.mkdir(parents=True, exist_ok=True)
    texts = {name: (PACKAGED / "vinyals" / name).read_text() for name in SPLIT_FILES}
    texts["trainval.txt"] = texts["train.txt"] + texts["val.txt"]
    for name, text in texts.items():
        write_atomically(lists / name, lambda stream, text=text: stream.write(text.encode()))
    shutil.copyfile(PACKAGED / "vinyals" / "LICENSE", lists / "LICENSE")
    shutil.copyfile(PACKAGED / "OMNIGLOT_LICENSE", folder / "LICENSE")
    target = folder / ARRAY_FILE
    write_atomically(target, lambda stream: np.savez_compressed(stream, **arrays))
    return target


def download(root: str | Path, source: str | None = None) -> Path:
    """Fetch the original zips (from ``source``, by default ``$MSR_OMNIGLOT_URL`` or the
    authors' repository) into ``root/omniglot/downloads/`` and ``convert`` them."""
    base = source or os.environ.get("MSR_OMNIGLOT_URL") or SOURCE
    folder = Path(root) / "omniglot"
    downloads = folder / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    for name in ZIPS:
        url = base.rstrip("/") + "/" + name
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                data = response.read()
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            message = f"could not download {url} ({reason}); " + by_hand(folder)
            raise OmniglotDataError(message) from None
        write_atomically(downloads / name, lambda stream, data=data: stream.write(data))
    return convert(downloads, root)
