"""Rebuild the fixtures in tests/data/ from the full data sets (run from the repository root,
with the full Omniglot copy and the e2cnn bases at the paths given; the tests never run it).

    python tests/data/make_fixtures.py OMNIGLOT_DIR E2CNN_BASES_NPZ

OMNIGLOT_DIR is a full Omniglot copy laid out as this project's development data:
omniglot_28x28_lanczos.npz, splits/vinyals/, standard_layout/images_{background,evaluation}.zip
and official/LICENSE. Writes tests/data/omniglot/: a subset of the array file (12 training, 6
validation and 6 test characters of the Vinyals splits with every drawing, plus the first three
background characters and the first evaluation one by folder name, which no list names)
with its split lists and licence, and zips/ with those four extra characters' original
105x105 drawings in the standard layout's two zips; and tests/data/e2cnn_c8_d8_bases.npz (a
copy).
"""

import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PER_SPLIT = {"train": 12, "val": 6, "test": 6}


def subset(source: Path, target: Path, extra: set[str]) -> None:
    lines = {
        split: (source / "splits" / "vinyals" / f"{split}.txt").read_text().split()
        for split in PER_SPLIT
    }
    chosen = {}
    for split, count in PER_SPLIT.items():
        characters = sorted({line.rsplit("/", 1)[0] for line in lines[split]})
        step = len(characters) // count  # spread over the alphabets
        chosen[split] = characters[::step][:count]
    with np.load(source / "omniglot_28x28_lanczos.npz") as data:
        arrays = {key: data[key] for key in data.files}
    names = arrays["alphabet_names"]
    keys = [
        f"{names[a]}/character{c:02d}"
        for a, c in zip(arrays["alphabet_index"], arrays["character_in_alphabet"], strict=True)
    ]
    wanted = {key for keys_ in chosen.values() for key in keys_} | extra
    rows = [i for i, key in enumerate(keys) if key in wanted]
    alphabets = sorted({int(arrays["alphabet_index"][i]) for i in rows})
    reindex = {old: new for new, old in enumerate(alphabets)}
    (target / "splits" / "vinyals").mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        target / "omniglot_28x28_lanczos.npz",
        images=arrays["images"][rows],
        alphabet_index=np.array(
            [reindex[int(arrays["alphabet_index"][i])] for i in rows], np.int16
        ),
        character_in_alphabet=arrays["character_in_alphabet"][rows],
        split=arrays["split"][rows],
        alphabet_names=names[alphabets],
    )
    for split, characters in chosen.items():
        kept = [line for line in lines[split] if line.rsplit("/", 1)[0] in characters]
        (target / "splits" / "vinyals" / f"{split}.txt").write_text("\n".join(kept) + "\n")
    shutil.copy(source / "splits" / "vinyals" / "LICENSE", target / "splits" / "vinyals")


def zips(source: Path, target: Path) -> set[str]:
    """The first characters (by folder name) of each standard-layout zip, as a zip of the same
    name; their keys ("Alphabet/characterNN")."""
    (target / "zips").mkdir(parents=True, exist_ok=True)
    keys = set()
    for name, count in (("images_background.zip", 3), ("images_evaluation.zip", 1)):
        with zipfile.ZipFile(source / "standard_layout" / name) as archive:
            names = sorted(n for n in archive.namelist() if n.endswith(".png"))
            characters = sorted({n.rsplit("/", 1)[0] for n in names})[:count]
            keys |= {c.split("/", 1)[1] for c in characters}
            with zipfile.ZipFile(target / "zips" / name, "w") as small:
                for member in names:
                    if member.rsplit("/", 1)[0] in characters:
                        small.writestr(member, archive.read(member))
    return keys


if __name__ == "__main__":
    omniglot, bases = map(Path, sys.argv[1:3])
    extra = zips(omniglot, HERE / "omniglot")
    subset(omniglot, HERE / "omniglot", extra)
    shutil.copy(omniglot / "official" / "LICENSE", HERE / "omniglot" / "LICENSE")
    shutil.copy(bases, HERE / "e2cnn_c8_d8_bases.npz")
