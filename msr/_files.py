"""Files written atomically and checksummed: what ``msr.viz.save`` and the drivers share."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file under this process's umask


def write_atomically(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """``write(stream)`` into a temporary file beside ``path``, sync it, give it the mode
    ``open`` would (the umask), and rename it over ``path``: a reader, a crash or a stop never
    sees a half-written file. On any failure the temporary file is removed, the previous
    ``path`` is as it was, and the error is raised."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, FILE_MODE)  # mkstemp makes 0600
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def content_digest(value: Any) -> str:
    """SHA-256 of a file's contents as loaded: every key, value, tensor dtype, shape and byte,
    in order. It names what was saved, not how torch laid it out on disk, so it is the same
    after loading onto another device."""
    digest = hashlib.sha256()
    _feed(digest, value)
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    if isinstance(value, Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}:".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}:".encode())
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, list | tuple):
        digest.update(f"{type(value).__name__}{len(value)}:".encode())
        for item in value:
            _feed(digest, item)
    elif value is None or isinstance(value, str | int | float | bool):
        digest.update(f"{type(value).__name__}:{value!r};".encode())
    else:
        raise TypeError(f"cannot checksum a {type(value).__name__} (plain values and tensors only)")
