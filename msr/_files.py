"""Files written atomically: what ``msr.viz.save`` and the experiment drivers share."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


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
