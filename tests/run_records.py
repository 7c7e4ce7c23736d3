"""Helpers and fixtures shared by the runner's tests (a pytest plugin of tests/conftest.py):
running the drivers in this process or as commands, reading their files and error lines, and
injecting faults (a filling disk, a signal at the n-th call) against an uninterrupted run's
outcome (``reference``)."""

import errno
import json
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO_ROOT

import msr
from experiments import cli, few_shot, redraw, report, rotation, synthetic
from experiments.control import run_cli
from experiments.rundir import MetricsLog, read_results
from msr import MAML


def logged_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, or of every job's in a run folder (in the order of their
    names), without their wall times (which no two runs share)."""
    files = sorted(path.glob("*/metrics.jsonl")) if path.is_dir() else [path]
    lines = [line for file in files for line in file.read_text().splitlines()]
    return [{k: v for k, v in json.loads(line).items() if k != "elapsed_s"} for line in lines]


def job_records(out: Path) -> list[dict]:
    """Every finished job's metrics records, in the job order of ``out``'s results.json."""
    tags = {
        f.parent: json.loads(f.read_text())["identity"]["tags"] for f in out.glob("*/result.json")
    }
    runs = json.loads((out / "results.json").read_text())["runs"]
    folders = [
        next(f for f, job in tags.items() if all(run[k] == v for k, v in job.items()))
        for run in runs
    ]
    return [
        json.loads(line) for f in folders for line in (f / "metrics.jsonl").read_text().splitlines()
    ]


def _state_and_parent(stat: Path) -> tuple[str, int] | None:
    """A process's state letter and parent pid, from its /proc/PID/stat (None once it is gone)."""
    try:
        state, parent = stat.read_text().rsplit(")", 1)[1].split()[:2]
    except OSError:
        return None
    return state, int(parent)


def children(pid: int) -> list[int]:
    """The live (not zombie) processes whose parent is ``pid``."""
    return [
        int(stat.parent.name)
        for stat in Path("/proc").glob("[0-9]*/stat")
        if (found := _state_and_parent(stat)) and found[1] == pid and found[0] != "Z"
    ]


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs (neither gone nor a zombie)."""
    found = _state_and_parent(Path(f"/proc/{pid}/stat"))
    return found is not None and found[0] != "Z"


def driver_status(main: Callable[[Sequence[str]], Any], prog: str, argv: Sequence[str]) -> int:
    """Run a driver's ``main(argv)`` in this process as its command does (``run_cli``: one line
    and a status for an error, 130 / 143 for a stop); its exit status."""
    try:
        run_cli(lambda: main(list(argv)), prog)
    except SystemExit as exit:
        return exit.code
    return 0


def error_lines(stderr: str) -> list[str]:
    """The error lines of a command's stderr; a traceback in it is an ``AssertionError``."""
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if "error:" in line]


def assert_redraw_reproduces(out: Path, figures: Sequence[Path]) -> None:
    """``python -m experiments.redraw out`` rewrites ``figures`` with the same bytes."""
    drawn = [f.read_bytes() for f in figures]
    redraw = subprocess.run(
        [sys.executable, "-m", "experiments.redraw", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert redraw.returncode == 0, redraw.stderr
    assert [f.read_bytes() for f in figures] == drawn


def run_module(module, *arguments, umask=None):
    """``python -m module --preset tiny *arguments`` (under ``umask`` if given), finished."""
    return subprocess.run(
        [sys.executable, "-m", module, "--preset", "tiny", *map(str, arguments)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=None if umask is None else (lambda: os.umask(umask)),
    )


def run_synthetic(out, *more, umask=None):
    """The Table 1 driver, one tiny job (MSR-FC, k = 1), as a command."""
    arguments = ("--methods", "MSR-FC", "--k", "1", "--out", out, *more)
    return run_module("experiments.synthetic", *arguments, umask=umask)


@pytest.fixture
def synthetic_here(in_process, capsys):
    """``run_synthetic`` in this process (no interpreter and torch to start): a
    ``CompletedProcess`` of its status and stderr."""

    def run(out, *more):
        argv = [*SYNTHETIC_TINY, "--out", str(out), *more]
        status = driver_status(synthetic.main, "experiments.synthetic", argv)
        return subprocess.CompletedProcess(argv, status, "", capsys.readouterr().err)

    return run


def one_line_error(done, status=2):
    """The command failed with ``status`` and one line of error, no traceback."""
    assert done.returncode == status, done.stderr
    [line] = error_lines(done.stderr)
    return line


MAINS = {
    "synthetic": synthetic.main,
    "few_shot": few_shot.main,
    "redraw": redraw.main,
    "report": report.main,
}


def one_line(capsys, name, *argv, status=2):
    """Run driver ``name``; it must fail with ``status`` and one error line, returned."""
    assert driver_status(MAINS[name], f"experiments.{name}", argv) == status
    [line] = error_lines(capsys.readouterr().err)
    return line


def succeeds(capsys, name, *argv):
    """Run driver ``name``; it must succeed (its stderr is dropped)."""
    assert driver_status(MAINS[name], f"experiments.{name}", argv) == 0
    capsys.readouterr()


SYNTHETIC_ARGS = ("--preset", "tiny", "--methods", "MAML-FC", "--k", "1", "--steps", "2")

FEW_SHOT_ARGS = ("--preset", "tiny", "--method", "maml")

DRIVERS = {  # module, and the arguments of a tiny run of two jobs (few_shot: one)
    "synthetic": (synthetic, shlex.split("--preset tiny --methods MSR-FC MAML-FC --k 1")),
    "rotation": (
        rotation,
        shlex.split("--preset tiny --group c8 --protocols paper --methods MSR-Conv MAML-Conv"),
    ),
    "few_shot": (few_shot, shlex.split("--preset tiny --method msr")),
}

FAULT_FEW_SHOT_MODEL = "msr_omniglot_5w1s_s0/model.pt"  # the few-shot job's checkpoint

FIRST_JOB = {"synthetic": "MSR-FC_k1_s0", "rotation": "MSR-Conv_c8_paper_s0"}

BAD_INPUT = {
    "synthetic": [("--steps", "0"), ("--inner-lr", "inf"), ("--seed", str(2**63))],
    "rotation": [("--inner-lr", "nan"), ("--seeds", "0", "-1")],
    "few_shot": [("--data", "/nonexistent"), ("--ways", "5000"), ("--steps", "-3")],
}


def run_driver(name, out, *more):
    """Run driver ``name`` on ``out`` as its command does; its exit status."""
    module, arguments = DRIVERS[name]
    return driver_status(module.main, module.__name__, [*arguments, "--out", str(out), *more])


def errors_since(capsys):
    """The error lines on stderr since the last call; a traceback fails the test."""
    return error_lines(capsys.readouterr().err)


def without_times(value):
    """``value`` (a results file's contents) without its wall times and commit."""
    if isinstance(value, dict):
        return {
            k: without_times(v)
            for k, v in value.items()
            if "wall" not in k and "elapsed" not in k and k != "git_sha"
        }
    if isinstance(value, list):
        return [without_times(v) for v in value]
    return value


def outcome(out: Path):
    """What a finished run leaves, without wall times: results, metrics, learned states."""
    models = {
        p.parent.name: {k: v.tolist() for k, v in msr.saving.read(p)["state_dict"].items()}
        for p in sorted(out.glob("*/model.pt"))
    }
    return (
        without_times(read_results(out / "results.json")),
        logged_metrics(out),
        models,
    )


def files_in(out: Path):
    """Every file below ``out`` (by its path there) with its bytes."""
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}


class Counter:
    """Counts calls to a patched function and does ``action`` on the ``at``-th (1-based)."""

    def __init__(self, at=None, action=None):
        self.calls, self.at, self.action = 0, at, action

    def wrap(self, function):
        def counted(*args, **kwargs):
            self.calls += 1
            if self.calls == self.at:
                self.action()
            return function(*args, **kwargs)

        return counted


class Disk:
    """A disk that fills up: from the ``full_at``-th write on (fsyncs and metrics appends
    counted together), every write fails with ENOSPC; an append fills it halfway first."""

    def __init__(self, monkeypatch, full_at=None):
        self.writes, self.full_at = 0, full_at
        real_fsync, real_init = os.fsync, MetricsLog.__init__
        disk = self

        def fsync(descriptor):
            disk.check()
            real_fsync(descriptor)

        def init(log, *args, **kwargs):
            real_init(log, *args, **kwargs)
            log._stream = FillingStream(log._stream, disk)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(MetricsLog, "__init__", init)

    def full(self) -> bool:
        self.writes += 1
        return self.full_at is not None and self.writes >= self.full_at

    def check(self) -> None:
        if self.full():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class FillingStream:
    def __init__(self, stream, disk):
        self.stream, self.disk = stream, disk

    def write(self, data):
        if self.disk.full():
            if len(data) > 1:  # the last space left: half the line lands
                return self.stream.write(bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.stream.write(data)

    def __getattr__(self, name):
        return getattr(self.stream, name)


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """Per driver: an uninterrupted run's outcome, and how many outer steps, evaluations and
    writes it made (to place each fault midway)."""
    found = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "reuse_freed_memory", lambda: False)
        for name in DRIVERS:
            out = tmp_path_factory.mktemp(name)
            steps, evaluations = Counter(), Counter()
            with pytest.MonkeyPatch.context() as counting:
                counting.setattr(torch.optim.Adam, "step", steps.wrap(torch.optim.Adam.step))
                counting.setattr(MAML, "evaluate", evaluations.wrap(MAML.evaluate))
                disk = Disk(counting)
                assert run_driver(name, out) == 0
            found[name] = {
                "outcome": outcome(out),
                "steps": steps.calls,
                "evaluations": evaluations.calls,
                "writes": disk.writes,
            }
    return found


def stopped_at_call(name, out, monkeypatch, cls, method, at):
    """Run ``name`` until SIGTERM arrives in the ``at``-th call of ``cls.method``; its status."""
    with monkeypatch.context() as patch:
        counter = Counter(at, lambda: os.kill(os.getpid(), signal.SIGTERM))
        patch.setattr(cls, method, counter.wrap(getattr(cls, method)))
        return run_driver(name, out)


SYNTHETIC_TINY = ["--preset", "tiny", "--methods", "MSR-FC", "--k", "1"]


@pytest.fixture
def in_process(monkeypatch):
    """The drivers' malloc tuning would stay with the test process: leave malloc alone."""
    monkeypatch.setattr(cli, "reuse_freed_memory", lambda: False)
