"""Files written atomically and checksummed: what ``msr.viz.save``, ``msr.saving`` and the
drivers share."""

from __future__ import annotations

import errno
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
    sees a half-written file; the folder is synced after the rename. On any failure the
    temporary file is removed, the previous ``path`` is as it was, and the error is raised."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, FILE_MODE)  # mkstemp makes 0600
        os.replace(temporary, path)  # a link at ``path`` is replaced, never followed
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    sync_directory(path.parent)


def sync_directory(folder: Path) -> None:
    """``fsync`` a folder, so that a rename in it survives a power loss (the file's own sync
    does not cover its directory entry)."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP):  # a file system without it
            raise
    finally:
        os.close(descriptor)


class ModelFileError(ValueError):
    """A model file that cannot be used: missing, unreadable, foreign, changed or damaged, or a
    model that cannot be described as data."""


CHECKSUM_KEY = "sha256"  # beside a checksummed file's own fields


def with_checksum(payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` with its ``content_digest`` under ``CHECKSUM_KEY``."""
    if CHECKSUM_KEY in payload:
        raise ValueError(f"{CHECKSUM_KEY!r} is reserved for the checksum")
    return {**payload, CHECKSUM_KEY: content_digest(payload)}


class ChecksumError(ModelFileError):
    """``without_checksum`` found no checksum (``absent``) or one that does not match."""

    def __init__(self, absent: bool) -> None:
        super().__init__(
            "holds no checksum: not a model file of this package, or one written before they "
            "were checksummed"
            if absent
            else "is corrupt: its contents do not match the SHA-256 checksum stored in it"
        )
        self.absent = absent


def without_checksum(saved: Any) -> dict[str, Any]:
    """What ``with_checksum`` stored, without its checksum, once the checksum matches; a
    ``ChecksumError`` otherwise."""
    if not isinstance(saved, dict) or not isinstance(saved.get(CHECKSUM_KEY), str):
        raise ChecksumError(absent=True)
    payload = {key: value for key, value in saved.items() if key != CHECKSUM_KEY}
    if content_digest(payload) != saved[CHECKSUM_KEY]:
        raise ChecksumError(absent=False)
    return payload


def load_weights_only(path: Path, map_location: Any = "cpu") -> Any:
    """A torch file loaded with ``weights_only=True`` (tensors and plain Python values only: a
    file that would run code is refused); a missing file is a ``FileNotFoundError``, any other
    failure a ``ModelFileError`` with torch's specific reason."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(4)
    except FileNotFoundError:
        raise
    except OSError as error:
        raise ModelFileError(f"{path} cannot be read: {error.strerror}") from None
    if head != b"PK\x03\x04" and head[:1] != b"\x80":  # torch's zip format, or legacy pickle
        raise ModelFileError(f"{path} is not a torch file (it begins with {head!r})")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many kinds: unpickling, zip, EOF, runtime
        # The specific line, not torch's advice to retry with weights_only=False.
        lines = [line.strip() for line in str(error).splitlines()]
        specific = [line for line in lines if line and not line.startswith(_TORCH_LOAD_ADVICE)]
        reason = specific[0] if specific else type(error).__name__
        raise ModelFileError(f"{path} cannot be loaded safely: {reason}") from None


_TORCH_LOAD_ADVICE = ("Weights only load failed", "Please file an issue", "Check the documentation")


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
