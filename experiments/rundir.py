"""A run's output directory: who may write in it, and the files it holds.

- ``claim_output``: a run never replaces an earlier run's files unless told (``--resume`` to
  continue it, ``--overwrite`` to replace it), and two runs never share a directory (an
  ``flock``-ed lock file naming its holder; a lock left by a dead process is taken over).
- The layout (``RUN_OUTPUTS``, ``JOB_FILES``): results.json, the summary, and a folder per job.
- Every file is written atomically (``atomic_write``): a reader, a crash or a stop never sees a
  half-written file, and a failed write keeps the previous one (``WriteFailedError``). Model
  files (``save_checkpoint``) and results files (``write_results``) carry a SHA-256 of their
  contents, verified on load; model files load without running code. ``MetricsLog`` appends a
  job's metrics.jsonl a flushed line at a time (and mirrors it to TensorBoard).
- Its refusals are ``experiments.control.RunError``: one line, exit status 2.

Torch is imported only where a file needs it: a start that only claims its folder (or is
refused) is quick.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import fnmatch
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from experiments.control import RunError, WriteFailedError, reported_write, write_error_reason

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

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


def git_sha() -> str:
    """The commit this code runs from ('-dirty' if tracked files changed; 'unknown' outside git)."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def provenance(seed: int | list[int], preset: str) -> dict[str, Any]:
    """The fields every results.json carries (``seeds`` for a run over several seeds)."""
    import torch

    return {
        "seeds" if isinstance(seed, list) else "seed": seed,
        "preset": preset,
        "torch_version": str(torch.__version__),  # a str subclass, which msr.save refuses
        "git_sha": git_sha(),
    }


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through a synced temporary file and a rename (``write_atomically``), so
    that a reader (or a crash, or a stop) never sees a half-written file. The file follows the
    umask like any other output. If the write fails (e.g. the disk is full) the previous
    ``path`` stays as it was and ``WriteFailedError`` says so."""
    from msr._files import write_atomically

    path.parent.mkdir(parents=True, exist_ok=True)
    with reported_write(path):
        write_atomically(path, write)


# A job's identity (what it runs: a resume must run the same) and its progress.
JOB_FIELDS = (
    *("driver", "seed", "tags", "preset", "config", "data_sha256", "torch_version", "git_sha"),
    *("step", "elapsed_s", "unvalidated"),
)


def save_checkpoint(
    path: Path, learner: torch.nn.Module, metadata: dict[str, Any], state: dict[str, Any]
) -> None:
    """A job's model file, its checkpoint while it trains: ``msr.save`` of the learner with the
    job and its progress (``JOB_FIELDS``) as ``metadata`` and the optimizer's ``state``; a
    failed write is a ``WriteFailedError`` (the previous file intact)."""
    import msr

    with reported_write(path):
        msr.save(learner, path, metadata, state=state)


def read_checkpoint(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """A job's model file (``msr.saving.read``: loaded without running code, its checksum
    verified); a missing, unsafe, damaged or foreign file is a ``RunError`` naming it."""
    import msr.saving

    try:
        saved = msr.saving.read(path, map_location)
    except FileNotFoundError:
        raise RunError(f"{path} does not exist") from None
    except msr.saving.ModelFileError as error:
        raise RunError(str(error)) from None
    if missing := sorted(set(JOB_FIELDS) - set(saved["metadata"])):
        raise RunError(
            f"{path} is no job's checkpoint (its metadata lacks {missing}): a file of msr.save, "
            "or of the drivers before their model files were msr.save files, which --resume "
            "does not read"
        )
    return saved


def differences(theirs: Any, ours: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """The fields in which a saved run (``theirs``, as loaded) differs from this one (``ours``),
    named by their path (e.g. ``config.steps``), with (theirs, ours); compared as JSON stores
    them (tuples are lists)."""
    theirs, ours = json.loads(json.dumps(theirs)), json.loads(json.dumps(ours))
    if not (isinstance(theirs, dict) and isinstance(ours, dict)):
        return {} if theirs == ours else {prefix or "value": (theirs, ours)}
    found: dict[str, tuple[Any, Any]] = {}
    for key in {**theirs, **ours}:
        name = f"{prefix}.{key}" if prefix else key
        if key not in theirs or key not in ours:
            found[name] = (theirs.get(key), ours.get(key))
        else:
            found.update(differences(theirs[key], ours[key], name))
    return found


def save_figure(figure: Figure, path: Path) -> Path:
    """``msr.viz.save`` (atomic); a failed write is a ``WriteFailedError``: one line, and the
    previous file intact."""
    from msr import viz

    with reported_write(path):
        return viz.save(figure, path)


def write_json_atomic(path: Path, payload: Any) -> None:
    """``atomic_write`` of indented JSON."""
    atomic_write(path, lambda stream: stream.write((json.dumps(payload, indent=2) + "\n").encode()))


def write_results(path: Path, results: dict[str, Any]) -> None:
    """A results file (a job's result.json, a run's results.json), atomically, with the
    SHA-256 of its fields, as stored: a resumed run keeps the jobs whose result it finds, and
    the report reads the summary, so ``read_results`` refuses a file edited or damaged since."""
    from msr._files import with_checksum

    stored = json.loads(json.dumps(results))  # as JSON gives it back: tuples are lists
    write_json_atomic(path, with_checksum(stored))


def read_results(path: Path) -> dict[str, Any]:
    """A results file written by ``write_results``, its checksum verified (without it); a
    missing, unreadable, foreign or changed file is a ``RunError`` naming it."""
    from msr._files import ChecksumError, without_checksum

    try:
        return without_checksum(read_json(path))
    except ChecksumError as error:
        why = (
            "is not a results file of these drivers (no sha256 checksum: a foreign file, or "
            "one written before results were checksummed)"
            if error.absent
            else "was changed after its run wrote it (its contents do not match the SHA-256 "
            "checksum stored in it); it was not used"
        )
        raise RunError(f"{path} {why}") from None


def read_json(path: Path) -> Any:
    """The JSON in ``path``; a missing, unreadable or corrupt file is a ``RunError``."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunError(f"{path} is not a readable JSON file ({error})") from None


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics log (the one reader of metrics.jsonl), each checked to be a
    JSON object with an integer ``step``; a corrupt one is a ``RunError``.
    A torn last line (no newline: a stop or a full disk in the middle of an append) is dropped
    with a message: the record it was belongs to work that a resumed run redoes."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise RunError(f"{path} cannot be read ({error})") from None
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            print(f"{path}: dropping its torn last line {lines.pop()[:40]!r}...", file=sys.stderr)
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise RunError(f"{path}, line {number}: not a JSON record ({error})") from None
        if not isinstance(record, dict):
            raise RunError(f"{path}, line {number}: not a JSON object")
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise RunError(f"{path}, line {number}: not a metrics record (no integer step)")
        records.append(record)
    return records


class MetricsLog:
    """A job's metrics.jsonl: append-only JSON lines, flushed after every record so a killed
    run keeps its history; the record of truth. With ``board`` (a folder: the job's
    TensorBoard run), every float field is also a scalar at the record's ``step`` under a
    standard tag (``board_tag``: ``train/loss``, ``val/accuracy``, ``test/mse``, ...);
    ``hparams`` and ``figures`` add the job's hyper-parameters and images."""

    def __init__(self, path: Path, board: Path | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.board = path, board
        self._writer: Any = None
        if board is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            except ImportError as error:
                raise ImportError(
                    "--tensorboard needs the tensorboard package: "
                    "pip install 'msr-symmetry[experiments]'"
                ) from error
        self._open()

    def _open(self) -> None:
        try:  # appended unbuffered: nothing left in a buffer if a write fails; never via a link
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
            self._stream = os.fdopen(os.open(self.path, flags, 0o666), "ab", buffering=0)
        except OSError as error:
            raise RunError(f"cannot append to {self.path}: {write_error_reason(error)}") from None

    def continue_from(self, step: int) -> None:
        """A resumed job logs again from ``step`` on: what a killed run logged there and later
        (work redone from the last checkpoint) is dropped from metrics.jsonl (atomically) and
        hidden in TensorBoard, so every step shows once."""
        kept = "".join(f"{json.dumps(r)}\n" for r in read_records(self.path) if r["step"] < step)
        self._stream.close()
        atomic_write(self.path, lambda stream: stream.write(kept.encode()))
        self._open()
        if self.board is not None:
            self._board_writer(purge_step=step)

    def _board_writer(self, purge_step: int | None = None) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            try:
                self._writer = SummaryWriter(str(self.board), purge_step=purge_step)
            except OSError as error:
                raise RunError(f"--tensorboard: cannot write in {self.board}: {error}") from None
        return self._writer

    def write(self, **record: Any) -> None:
        """Append ``record`` as one line; a failed write (e.g. a full disk) is a
        ``WriteFailedError`` and leaves the earlier lines as they were."""
        remaining = memoryview((json.dumps(record) + "\n").encode())
        try:
            while remaining:
                remaining = remaining[self._stream.write(remaining) :]
        except OSError as error:
            raise WriteFailedError(
                f"could not append to {self.path}: {write_error_reason(error)}; the records "
                "before are intact"
            ) from error
        if self.board is not None:
            writer = self._board_writer()
            for key, value in record.items():
                if isinstance(value, float):
                    writer.add_scalar(board_tag(key), value, record["step"])
            writer.flush()

    def hparams(self, values: dict[str, Any], scores: dict[str, float]) -> None:
        """A finished job's hyper-parameters (the scalars of ``values``: its config and tags)
        beside its final ``scores`` (by TensorBoard tag); nothing without ``board``."""
        if self.board is not None:
            plain = {k: v for k, v in values.items() if isinstance(v, bool | int | float | str)}
            self._board_writer().add_hparams(plain, scores, run_name=".")  # into its own run

    def figures(self, step: int, figures: dict[str, Figure]) -> None:
        """Images of the job at ``step`` (e.g. its learned U), by tag; nothing without ``board``."""
        if self.board is not None:
            writer = self._board_writer()
            for tag, figure in figures.items():
                writer.add_figure(tag, figure, step)  # closes the figure
            writer.flush()

    def close(self) -> None:
        self._stream.close()
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_SPLITS = ("train", "val", "test")


def board_tag(key: str) -> str:
    """A metrics-record field's TensorBoard tag: ``<split>_<metric>`` becomes
    ``<split>/<metric>`` (``train_loss`` -> ``train/loss``, ``val_accuracy`` ->
    ``val/accuracy``), anything else ``run/<key>`` (e.g. ``run/elapsed_s``)."""
    split, _, metric = key.partition("_")
    return f"{split}/{metric}" if split in _SPLITS and metric else f"run/{key}"
