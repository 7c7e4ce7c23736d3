"""The files a run writes into its output directory (``experiments.rundir`` claims it):
nothing lost, nothing hidden.

- Every file is written atomically (``atomic_write``): a reader, a crash or a stop never sees a
  half-written file, and a failed write keeps the previous one (``WriteFailedError``).
- Model files (each job's checkpoint while it trains) and results.json carry a SHA-256 of
  their contents, verified on load; model files load without running code.
- ``MetricsLog`` appends metrics.jsonl a flushed line at a time (and mirrors it to TensorBoard).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch

import msr
from experiments.control import RunError, WriteFailedError, reported_write, write_error_reason
from experiments.rundir import REPO_ROOT
from msr import viz
from msr._files import ChecksumError, with_checksum, without_checksum, write_atomically
from msr.saving import ModelFileError

if TYPE_CHECKING:
    from matplotlib.figure import Figure


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
    with reported_write(path):
        msr.save(learner, path, metadata, state=state)


def read_checkpoint(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """A job's model file (``msr.saving.read``: loaded without running code, its checksum
    verified); a missing, unsafe, damaged or foreign file is a ``RunError`` naming it."""
    try:
        saved = msr.saving.read(path, map_location)
    except FileNotFoundError:
        raise RunError(f"{path} does not exist") from None
    except ModelFileError as error:
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
    with reported_write(path):
        return viz.save(figure, path)


def write_json_atomic(path: Path, payload: Any) -> None:
    """``atomic_write`` of indented JSON."""
    atomic_write(path, lambda stream: stream.write((json.dumps(payload, indent=2) + "\n").encode()))


def write_results(path: Path, results: dict[str, Any]) -> None:
    """A results file (a job's result.json, a run's results.json), atomically, with the
    SHA-256 of its fields, as stored: a resumed run keeps the jobs whose result it finds, and
    the report reads the summary, so ``read_results`` refuses a file edited or damaged since."""
    stored = json.loads(json.dumps(results))  # as JSON gives it back: tuples are lists
    write_json_atomic(path, with_checksum(stored))


def read_results(path: Path) -> dict[str, Any]:
    """A results file written by ``write_results``, its checksum verified (without it); a
    missing, unreadable, foreign or changed file is a ``RunError`` naming it."""
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
