"""Helpers shared by the test modules that stop runs and compare their files across resumes."""

import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from conftest import REPO_ROOT

from experiments.control import run_cli


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
