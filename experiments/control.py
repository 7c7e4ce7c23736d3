"""How a run ends: its errors, its stops and its exit status (the bottom layer of the runner).

- ``RunError``: a problem the user can fix (a bad path, a foreign file, a busy folder): one
  line, status 2. ``RunFailedError``: one the run met (a full disk, a lost worker or rank, a
  non-finite loss): one line, status 1.
- SIGINT / SIGTERM are deferred (``deferred_stops``) and taken at the next safe point
  (``raise_if_stopped``: between outer steps and between evaluation chunks): a message and
  status 130 / 143, and ``--resume`` continues. A second signal stops at once.

No torch at import: a start that is refused early is quick.
"""

from __future__ import annotations

import errno
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class RunError(Exception):
    """A problem the user can fix; shown as one line, exit status 2."""


class RunFailedError(RunError):
    """The run failed for a reason outside its inputs; shown as one line, exit status 1."""


class WriteFailedError(RunFailedError):
    """An output file could not be written; the previous version is intact."""


@contextmanager
def reported_write(path: Path) -> Iterator[None]:
    """Inside, a failed atomic write of ``path`` (an ``OSError``, e.g. a full disk) becomes a
    ``WriteFailedError``: one line, saying that the previous file is intact."""
    try:
        yield
    except OSError as error:
        kept = (
            f"the previous {path.name} is intact"
            if path.exists()
            else f"no {path.name} was written"
        )
        raise WriteFailedError(
            f"could not write {path}: {write_error_reason(error)}; {kept}"
        ) from error


def write_error_reason(error: OSError) -> str:
    """Why a write failed, in words."""
    return "the disk is full" if error.errno == errno.ENOSPC else (error.strerror or str(error))


class Stopped(BaseException):
    """SIGINT or SIGTERM asked the run to stop (raised by ``raise_if_stopped``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signal.Signals(signum)


_requested = 0  # the signal that asked the run to stop (0: none), until it stops


@contextmanager
def deferred_stops() -> Iterator[None]:
    """Inside, SIGINT and SIGTERM are recorded, not raised where they land: an exception at an
    arbitrary bytecode can break torch's own state (e.g. inside ``vmap``) and hide the stop
    behind an internal error. A second signal raises at once."""
    global _requested

    def request(signum: int, frame: object) -> None:
        global _requested
        if _requested:
            raise Stopped(signum)
        _requested = signum

    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum in previous:
        signal.signal(signum, request)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _requested = 0


def raise_if_stopped(device: torch.device | None = None) -> None:
    """The one stop check: raise ``Stopped`` if a signal asked the run to stop.

    With ``device`` under torch.distributed the ranks agree (the largest signal any has seen,
    one all-reduce), so every rank must call it at the same point: a signal often reaches one
    rank alone, and a rank that stopped alone would leave the others waiting."""
    signum = _requested
    if device is not None:
        import torch
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            seen = torch.tensor([signum], device=device)
            dist.all_reduce(seen, op=dist.ReduceOp.MAX)
            signum = int(seen.item())
    if signum:
        raise Stopped(signum)


def run_cli(main: Callable[[], Any], prog: str) -> None:
    """Run a driver's ``main`` as a command: a ``RunError`` is one line and status 2 (1 for a
    ``RunFailedError``, a non-finite loss or a lost rank); a stop is a message and 128 + the
    signal."""
    try:
        with deferred_stops():
            main()
    except (RunFailedError, FloatingPointError) as error:  # FloatingPointError: a NaN loss
        _exit(prog, str(error), 1)
    except RuntimeError as error:
        if not _collective_failure(error):
            raise
        import torch.distributed as dist

        reason = str(error).splitlines()[0].split("] ")[-1][:160]
        _exit(
            prog,
            f"rank {dist.get_rank()} lost contact with another rank ({reason}): a rank was "
            f"killed, stopped or is stuck; {KEPT}",
            1,
        )
    except RunError as error:
        _exit(prog, str(error), 2)
    except Stopped as stop:
        print(
            f"\n{prog}: stopped by {stop.signum.name}; the files in --out are consistent (the "
            "finished jobs, and the last checkpoint of the others): run the same command with "
            "--resume to continue",
            file=sys.stderr,
        )
        sys.exit(128 + stop.signum)


KEPT = (
    "the finished jobs and the last checkpoint are kept: run the same command with --resume "
    "to continue"
)


def _exit(prog: str, message: str, status: int) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(status)


def _collective_failure(error: RuntimeError) -> bool:
    """Whether ``error`` is a failed torch.distributed collective (a peer gone, or the
    collective timeout passed): DistError for nccl, gloo's transport error for gloo."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not (dist.is_available() and dist.is_initialized()):
        return False
    return isinstance(error, dist.DistError) or "gloo/transport" in str(error)
