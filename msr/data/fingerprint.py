"""What a data set is, as one SHA-256: a run records it and a resumed run checks it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_BLOCK = 1 << 20


def fingerprint(*paths: str | Path) -> str:
    """SHA-256 of the data at ``paths``, in order: a file by its bytes, a folder by its listing
    (every file's path relative to the folder and its size, sorted; links are not followed),
    so that other data under the same name, or the same data moved, is told apart from or
    matched to what a run trained on. A missing path is a ``FileNotFoundError``."""
    digest = hashlib.sha256()
    for path in map(Path, paths):
        if path.is_file():
            digest.update(b"file\0")
            with path.open("rb") as stream:
                while block := stream.read(_BLOCK):
                    digest.update(block)
        elif path.is_dir():
            digest.update(b"folder\0")
            for folder, names, files in sorted(os.walk(path)):
                names.sort()
                for name in sorted(files):
                    file = Path(folder, name)
                    size = file.lstat().st_size
                    digest.update(f"{file.relative_to(path).as_posix()}\0{size}\0".encode())
        else:
            raise FileNotFoundError(f"no data at {path}")
    return digest.hexdigest()
