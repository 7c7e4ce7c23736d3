"""A run's output directory: who may write in it (the files a run writes there:
``experiments.runfiles``).

- ``claim_output``: a run never replaces an earlier run's files unless told (``--resume`` to
  continue it, ``--overwrite`` to replace it), and two runs never share a directory (an
  ``flock``-ed lock file naming its holder; a lock left by a dead process is taken over).
- Its refusals are ``experiments.control.RunError``: one line, exit status 2.

No torch here: a start that only claims its folder (or is refused) is quick.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import fnmatch
import os
import shutil
import socket
import sys
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

from experiments.control import RunError, write_error_reason

REPO_ROOT = Path(__file__).resolve().parent.parent

# A run's --out: results.json (the summary of its jobs, rewritten after each), one folder per
# job (``JOB_FILES``: its model file, which is its checkpoint while it trains, its metrics log,
# its result, written last, and its figure), tensorboard/ and a report's curve_*.png.
# --overwrite removes these (and nothing else).
RUN_OUTPUTS = ("results.json", "tensorboard", "curve_*.png")
JOB_FILES = ("model.pt", "metrics.jsonl", "result.json", "*.png")
OLD_LAYOUT = ("metrics.jsonl",)  # what every run folder of msr before the job folders holds
LOCK_NAME = ".lock"
LOCK_ATTEMPTS = 100  # a lock released between our open and flock is tried again, this often


@contextmanager
def claim_output(out: Path, resume: bool, overwrite: bool) -> Iterator[Path]:
    """Hold ``out`` for this run: create it, lock it, and refuse to replace an earlier run's
    outputs unless ``resume`` (the driver continues them) or ``overwrite`` (they are removed).

    A file in a job folder that no run writes (e.g. your own notes) is refused before anything
    is removed, and so is a run folder of the layout before job folders. A run follows no link
    inside ``out``: a link where a run writes is refused. The temporary files of a write that
    was killed midway are removed."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a directory")
    if resume and overwrite:
        raise RunError("--resume continues the run in --out and --overwrite replaces it: pick one")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunError(f"cannot create --out {out}: {error.strerror}") from None
    lock = _take_lock(out / LOCK_NAME)
    try:
        _refuse_links(out)
        _remove_stale_temporaries(out)
        earlier = run_outputs(out)
        if earlier and not (resume or overwrite):
            shown = ", ".join(earlier[:4]) + (", ..." if len(earlier) > 4 else "")
            raise RunError(
                f"{out} already holds a run ({shown}): pass --resume to continue it, choose "
                "another --out, or pass --overwrite to replace it"
            )
        if earlier and (old := _matching(out, OLD_LAYOUT)):
            raise RunError(
                f"{out} holds {old[0]}: a run folder of msr before runs wrote one folder per "
                "job, which --resume and --overwrite do not read; finish it with the commit that "
                "wrote it (its results.json names it), or choose another --out"
            )
        foreign = [f"{job}/{name}" for job in job_folders(out) for name in _foreign(out / job)]
        if earlier and foreign:
            raise RunError(
                f"{out} holds {', '.join(foreign[:4])}, which no run writes; "
                f"--{'overwrite' if overwrite else 'resume'} touches only a run's files: move "
                "these away, or choose another --out"
            )
        if overwrite:
            for name in earlier:
                path = out / name
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        yield out
    finally:
        _release_lock(lock)


def run_outputs(out: Path) -> list[str]:
    """The names in ``out`` that a run writes (``RUN_OUTPUTS`` and the job folders), links to
    nowhere included."""
    return sorted({*_matching(out, RUN_OUTPUTS), *job_folders(out)})


def job_folders(out: Path) -> list[str]:
    """The folders in ``out`` that hold a job's files (its model, metrics or result)."""
    folders = [out / n for n in _names(out) if (out / n).is_dir() and not (out / n).is_symlink()]
    return sorted(folder.name for folder in folders if _matching(folder, JOB_FILES[:3]))


def _foreign(folder: Path) -> list[str]:
    """The names in a job folder that no job writes."""
    ours = _matching(folder, JOB_FILES)
    return [name for name in _names(folder) if name not in ours]


def _matching(folder: Path, patterns: Collection[str]) -> list[str]:
    names = _names(folder)
    return sorted(n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns))


def _names(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError as error:
        raise RunError(f"cannot read {folder}: {error.strerror}") from None


def _refuse_links(out: Path) -> None:
    """A ``RunError`` for a symbolic link where a run writes (a run output, or anywhere in
    the TensorBoard tree; the lock is ``_take_lock``'s): writing through it would change a
    file outside ``out``."""
    for name in run_outputs(out):
        path = out / name
        links = [path] if path.is_symlink() else []
        if path.is_dir() and not path.is_symlink():
            for folder, names, files in os.walk(path):  # links are not followed
                links += [Path(folder, n) for n in names + files if Path(folder, n).is_symlink()]
        if links:
            raise RunError(
                f"{links[0]} is a symbolic link (to {os.readlink(links[0])}): a run follows no "
                "link inside --out; remove it, or choose another --out"
            )


def _remove_stale_temporaries(out: Path) -> None:
    """Remove the temporary files (``.<run file>.<random>.tmp``, see
    ``msr._files.write_atomically``) that a write killed midway left in ``out`` or a job
    folder: the lock is ours, so no write is under way."""
    for folder, patterns in [(out, RUN_OUTPUTS), *((out / j, JOB_FILES) for j in job_folders(out))]:
        for name in _names(folder):
            if not (name.startswith(".") and name.endswith(".tmp")) or name.count(".") < 3:
                continue
            written = name[1:].rsplit(".", 2)[0]  # the file the write was replacing
            if any(fnmatch.fnmatchcase(written, p) for p in patterns) and (folder / name).is_file():
                (folder / name).unlink()


def _take_lock(path: Path) -> Path:
    """Hold ``path`` with an exclusive ``flock`` for this process's life and write our name in it.

    The kernel arbitrates: of any number of simultaneous starts exactly one gets the lock, and a
    lock whose holder has ended (killed, or a full disk that left the file empty) is not held,
    so it is taken over (with a note naming the earlier holder, or saying the file was empty)."""
    for _ in range(LOCK_ATTEMPTS):
        try:
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            descriptor, created = os.open(path, flags, 0o644), True
        except FileExistsError:
            try:
                descriptor, created = os.open(path, os.O_RDWR | os.O_NOFOLLOW), False
            except FileNotFoundError:
                continue  # released in between: try again
            except OSError as error:
                if error.errno == errno.ELOOP:
                    raise RunError(
                        f"the lock file {path} is a symbolic link: a run follows no link inside "
                        "--out; remove it, or choose another --out"
                    ) from None
                raise RunError(f"cannot open the lock file {path}: {error.strerror}") from None
        except OSError as error:
            raise RunError(f"cannot write in --out {path.parent}: {error.strerror}") from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(descriptor)
            os.close(descriptor)
            named = f"process {holder}" if holder else "another process"
            raise RunError(
                f"{path.parent} is in use by {named} (lock file {path}); wait for it to end or "
                "choose another --out"
            ) from None
        if _same_file(descriptor, path):
            break
        os.close(descriptor)  # released and removed between our open and flock: try again
    else:
        raise RunError(
            f"could not take the lock file {path} in {LOCK_ATTEMPTS} tries: other runs keep "
            "taking and releasing it; try again, or choose another --out"
        )
    if not created:
        earlier = _holder_text(descriptor)
        print(
            f"taking over the stale lock {path} of process {earlier}, which ended"
            if earlier
            else f"taking over the lock {path}, empty or unreadable: its run ended before it "
            "could name itself (e.g. on a full disk)",
            file=sys.stderr,
        )
    try:
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        os.fsync(descriptor)
    except OSError as error:
        path.unlink(missing_ok=True)
        os.close(descriptor)
        raise RunError(f"cannot write the lock file {path}: {write_error_reason(error)}") from None
    _held[path] = descriptor
    atexit.register(_release_lock, path)
    return path


_held: dict[Path, int] = {}  # lock file -> its open, flock-ed descriptor


def busy_holder(out: Path) -> str | None:
    """Who holds ``out``'s lock now ("PID on HOST", or "another process"); None if no run
    does. Takes nothing: for readers such as ``experiments.redraw``."""
    try:
        descriptor = os.open(out / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None  # no lock file (or a link, which no run holds)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder_text(descriptor) or "another process"
    finally:
        os.close(descriptor)  # also drops a shared lock we got
    return None


def _holder_text(descriptor: int) -> str:
    """What a lock file says of its holder ("PID on HOST"); "" if empty or unreadable."""
    try:
        text = os.pread(descriptor, 256, 0).decode()
    except (OSError, UnicodeDecodeError):
        return ""
    return text.strip() if text.strip().isprintable() else ""


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        here, there = os.fstat(descriptor), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _release_lock(path: Path) -> None:
    """Remove the lock file, then drop the lock (a waiting start re-checks the file it holds)."""
    descriptor = _held.pop(path, None)
    if descriptor is not None:
        path.unlink(missing_ok=True)
        os.close(descriptor)
