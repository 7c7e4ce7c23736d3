"""Pieces every experiment driver shares: statistics, provenance, and files written safely."""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import scipy.stats
import torch
from torch import Tensor

from experiments.rundir import (
    RunError,
    WriteFailedError,
    describe_write_error,
    write_error_reason,
)
from msr import viz
from msr._files import write_atomically

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPO_ROOT = Path(__file__).resolve().parent.parent


def mean_ci95(values: Tensor) -> tuple[float, float]:
    """Mean and half-width of the 95% Student-t confidence interval over independent values."""
    values = values.detach().double().flatten()
    count = values.numel()
    if count < 2:
        raise ValueError(f"a confidence interval needs at least 2 values, got {count}")
    sem = values.std(unbiased=True).item() / math.sqrt(count)
    return values.mean().item(), scipy.stats.t.ppf(0.975, count - 1) * sem


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` that says each option's default where it has one (not None, not a flag's
    False): what a run does when the option is left out."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or default is argparse.SUPPRESS
        if action.option_strings and not unset and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


SEED_HELP = "seeds the data, the initialization and every random stream: same seed, same run"
DEVICE_HELP = "auto (CUDA when available), cpu, cuda or cuda:N"
OVERWRITE_HELP = "replace the earlier run's files in DIR (without it, a non-empty DIR is refused)"
TENSORBOARD_HELP = "also log the metrics to DIR/tensorboard (metrics.jsonl stays the record)"


SEED_LIMIT = 2**63  # seeds are 0 <= seed < 2**63: what torch.manual_seed and the streams take


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (outer steps, ways, shots, workers)."""
    return _parsed(text, int, lambda value: value >= 1, "a positive integer")


def positive_finite_float(text: str) -> float:
    """An argparse type: a finite number > 0 (a learning rate); refuses inf and nan."""
    return _parsed(text, float, lambda v: math.isfinite(v) and v > 0, "a positive finite number")


def seed_value(text: str) -> int:
    """An argparse type: a seed, 0 <= seed < 2**63."""
    return _parsed(text, int, lambda value: 0 <= value < SEED_LIMIT, "a seed in 0 .. 2**63 - 1")


def _parsed(text: str, kind: Callable[[str], Any], valid: Callable[[Any], bool], what: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not valid(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value


def launched_by_torchrun() -> bool:
    """Whether this process is one of several ranks started by ``torchrun`` (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def resolve_device(spec: str) -> torch.device:
    """The device ``--device`` names (see ``DEVICE_HELP``), checked to exist on this machine.

    On CUDA it also turns TF32 off for matmuls and cuDNN convolutions (torch allows it in
    convolutions by default): the drivers compute in full fp32, as on the CPU.
    """
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {spec!r}; expected {DEVICE_HELP}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {spec}: CUDA is not available here (torch {torch.__version__}, "
                f"built for CUDA {torch.version.cuda}); use --device cpu or auto"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {spec}: this machine has {count} CUDA device(s)")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        if device.index is None:  # recorded as e.g. cuda:0 in results.json
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve every allocation from its heap and keep freed memory for reuse.

    By default glibc maps each allocation above a threshold afresh and hands it back on free, so
    a training step that allocates the same multi-MB tensors every time page-faults them all in
    again: measured on a D8 meta-step (32 tasks, 48 channels), 120k minor faults and 60% of the
    time in the kernel; with this, 66 faults and 292 -> 101 ms. The cost: the process keeps its
    peak memory. Drivers call it at start; returns False where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


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
        "torch_version": torch.__version__,
        "git_sha": git_sha(),
    }


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through a synced temporary file and a rename (``write_atomically``), so
    that a reader (or a crash, or a stop) never sees a half-written file. The file follows the
    umask like any other output. If the write fails (e.g. the disk is full) the previous
    ``path`` stays as it was and ``WriteFailedError`` says so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_atomically(path, write)
    except OSError as error:
        raise describe_write_error(path, error) from error


def save_model(
    path: Path, learner: torch.nn.Module, driver: str, seed: int, tags: dict[str, Any], config: Any
) -> None:
    """Write what a run learned (atomically, checksummed): the learner's state dict on the CPU
    (the model's parameters and buffers, and MAML's inner lrs), with what rebuilds it: the
    driver, seed, job tags and config. Plain tensors and Python values only: ``load_model``
    reads it with ``weights_only=True``, and so can ``torch.load``."""
    payload = {
        "driver": driver,
        "seed": seed,
        "tags": dict(tags),
        "config": asdict(config),
        "state_dict": {n: t.detach().cpu() for n, t in learner.state_dict().items()},
    }
    save_checked(path, payload)


def load_model(path: Path) -> dict[str, Any]:
    """A file written by ``save_model``, its checksum verified (no code runs while it loads)."""
    saved = load_checked(path)
    missing = {"driver", "seed", "tags", "config", "state_dict"} - set(saved)
    if missing:
        raise RunError(f"{path} is not a model file of this project (missing {sorted(missing)})")
    return saved


CHECKSUM_KEY = "sha256"  # beside a checkpoint's or model file's own fields


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


def save_checked(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` a dict atomically, with the ``content_digest`` of its fields stored beside
    them, so that ``load_checked`` notices any change (a flipped bit, a truncation)."""
    checked = _with_checksum(payload)
    atomic_write(path, lambda stream: torch.save(checked, stream))


def load_checked(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """A dict written by ``save_checked``: loaded safely (``load_torch_file``), its checksum
    verified; a mismatch, or a file without one, is a ``RunError`` naming the file."""
    return _verified(
        path,
        load_torch_file(path, map_location),
        absent="holds no checksum: not a checkpoint or model file of this project, or one "
        "written before they were checksummed, so it cannot be verified",
        changed="is corrupt: its contents do not match the SHA-256 checksum stored in it "
        "(a changed or damaged file); it was not used",
    )


def _with_checksum(payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` with its ``content_digest`` under ``CHECKSUM_KEY``."""
    if CHECKSUM_KEY in payload:
        raise ValueError(f"{CHECKSUM_KEY!r} is reserved for the checksum")
    return {**payload, CHECKSUM_KEY: content_digest(payload)}


def _verified(path: Path, saved: Any, absent: str, changed: str) -> dict[str, Any]:
    """What ``_with_checksum`` stored, without its checksum, once the checksum matches; a
    ``RunError`` "``path`` ``absent``" without one, "``path`` ``changed``" on a mismatch."""
    if not isinstance(saved, dict) or not isinstance(saved.get(CHECKSUM_KEY), str):
        raise RunError(f"{path} {absent}")
    payload = {key: value for key, value in saved.items() if key != CHECKSUM_KEY}
    if content_digest(payload) != saved[CHECKSUM_KEY]:
        raise RunError(f"{path} {changed}")
    return payload


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
    try:
        return viz.save(figure, path)
    except OSError as error:
        raise describe_write_error(path, error) from error


def write_json_atomic(path: Path, payload: Any) -> None:
    """``atomic_write`` of indented JSON."""
    atomic_write(path, lambda stream: stream.write((json.dumps(payload, indent=2) + "\n").encode()))


def write_results(path: Path, results: dict[str, Any]) -> None:
    """A results.json (atomically), with the ``content_digest`` of its fields, as stored, under
    ``CHECKSUM_KEY``: a resumed run builds on the runs in it, so ``read_results`` refuses a file
    that was edited or damaged since."""
    stored = json.loads(json.dumps(results))  # as JSON gives it back: tuples are lists
    write_json_atomic(path, _with_checksum(stored))


def read_results(path: Path) -> dict[str, Any]:
    """A results.json written by ``write_results``, its checksum verified (without it); a
    missing, unreadable, foreign or changed file is a ``RunError`` naming it."""
    return _verified(
        path,
        read_json(path),
        absent=f"is not a results file of these drivers (no {CHECKSUM_KEY} checksum: a foreign "
        "file, or one written before results were checksummed)",
        changed="was changed after its run wrote it (its contents do not match the SHA-256 "
        "checksum stored in it); it was not used",
    )


def keep_lines(path: Path, keep: Callable[[dict[str, Any]], bool]) -> None:
    """Rewrite a JSON-lines file (atomically) with only the records ``keep`` accepts; used on
    resume to forget what a killed run logged after its last saved state (it is redone)."""
    if path.exists():
        kept = [line for line in read_lines(path) if keep(json.loads(line))]
        atomic_write(path, lambda stream: stream.write("".join(f"{x}\n" for x in kept).encode()))


def read_json(path: Path) -> Any:
    """The JSON in ``path``; a missing, unreadable or corrupt file is a ``RunError``."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunError(f"{path} is not a readable JSON file ({error})") from None


def read_lines(path: Path) -> list[str]:
    """The lines of a metrics log, each checked to be a JSON record with an integer ``step``;
    a corrupt one is a ``RunError``.
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
    return lines


def load_torch_file(path: Path, map_location: Any = "cpu") -> Any:
    """A checkpoint or model file, loaded with ``weights_only=True`` (tensors and plain Python
    values only: a file that would run code is refused); any failure is a ``RunError``."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise RunError(f"{path} does not exist") from None
    except Exception as error:  # torch raises many kinds: unpickling, zip, EOF, runtime
        # The specific line, not torch's advice to retry with weights_only=False.
        lines = [line.strip() for line in str(error).splitlines()]
        specific = [line for line in lines if line and not line.startswith(_TORCH_LOAD_ADVICE)]
        reason = specific[0] if specific else type(error).__name__
        raise RunError(f"{path} cannot be loaded safely: {reason}") from None


# Paragraphs of torch.load's weights_only error that are advice, not the reason.
_TORCH_LOAD_ADVICE = ("Weights only load failed", "Please file an issue", "Check the documentation")


class MetricsLog:
    """Append-only JSON-lines log, flushed after every record so a killed run keeps its history;
    the record of truth. With ``tensorboard`` (a folder), each record's float fields also go
    to TensorBoard as scalars at its ``step``, under a name made of its other fields (e.g.
    ``MSR-FC/k=1/seed=0/test_mse``)."""

    def __init__(self, path: Path, tensorboard: Path | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._board = None
        if tensorboard is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ImportError(
                    "--tensorboard needs the tensorboard package: pip install 'msr[experiments]'"
                ) from error
            if tensorboard.is_symlink() and not tensorboard.exists():
                raise RunError(
                    f"--tensorboard: {tensorboard} is a link to {os.readlink(tensorboard)}, "
                    "which does not exist"
                )
            try:
                self._board = SummaryWriter(str(tensorboard))
            except OSError as error:
                raise RunError(f"--tensorboard: cannot write in {tensorboard}: {error}") from None
        self._stream = path.open("ab", buffering=0)  # nothing left in a buffer if a write fails

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
        if self._board is not None:
            run = "/".join(
                str(v) if isinstance(v, str) else f"{k}={v}"
                for k, v in record.items()
                if k != "step" and not isinstance(v, float)
            )
            for key, value in record.items():
                if isinstance(value, float):
                    self._board.add_scalar(f"{run}/{key}" if run else key, value, record["step"])
            self._board.flush()

    def close(self) -> None:
        self._stream.close()
        if self._board is not None:
            self._board.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
