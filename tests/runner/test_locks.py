"""An --out is held by exactly one run: a live holder refuses the others, whatever number start
at once; a lock whose run ended (killed, or on a full disk before it could name itself) is
taken over with a note and never wedges the directory."""

import errno
import os
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import REPO_ROOT

from experiments.control import RunError
from experiments.rundir import LOCK_NAME, claim_output

# Claims --out at a given moment, holds it a while, and says whether it won.
CLAIM = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from experiments.control import RunError
    from experiments.rundir import claim_output
    out, start, hold = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
    time.sleep(max(0.0, start - time.time()))
    try:
        with claim_output(out, resume=False, overwrite=False):
            print("won", flush=True)
            time.sleep(hold)
    except RunError as error:
        print("refused:", error, flush=True)
    """
)


def _claimers(out, count, start, hold):
    return [
        subprocess.Popen(
            [sys.executable, "-c", CLAIM, str(out), str(start), str(hold)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]


def _ended_pid():
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    return ended.pid


def test_of_many_simultaneous_starts_on_a_stale_lock_exactly_one_wins(tmp_path):
    """Before flock: two starts that both found a stale lock both took it, 7 times in 100.
    8 rounds in 8 folders, side by side: in each, 6 processes start at the same moment."""
    rounds = []
    for round_ in range(8):
        out = tmp_path / f"run{round_}"
        out.mkdir()
        (out / LOCK_NAME).write_text(f"{_ended_pid()} {os.uname().nodename}\n")
        rounds.append(out)
    start = time.time() + 3.0  # every process started and waiting by then
    claimers = [_claimers(out, 6, start, hold=1.0) for out in rounds]
    for out, processes in zip(rounds, claimers, strict=True):
        outputs = [process.communicate(timeout=60) for process in processes]
        said = [stdout.strip() for stdout, _ in outputs]
        assert sum(line == "won" for line in said) == 1, (said, [err for _, err in outputs])
        refused = [line for line in said if line != "won"]
        assert all(line.startswith("refused:") and "is in use by" in line for line in refused)
        assert not (out / LOCK_NAME).exists()  # the winner removed it at its end


def test_a_live_lock_refuses_naming_its_holder_and_a_dead_ones_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    (holder,) = _claimers(out, 1, time.time(), hold=30.0)
    assert holder.stdout.readline().strip() == "won"
    busy = pytest.raises(RunError, match=rf"is in use by process {holder.pid} on ")
    with busy, claim_output(out, resume=False, overwrite=False):
        pass
    holder.kill()  # SIGKILL: no clean-up, the lock file stays
    holder.wait()
    assert (out / LOCK_NAME).read_text().startswith(f"{holder.pid} on ")
    with claim_output(out, resume=False, overwrite=False):
        assert (out / LOCK_NAME).read_text().startswith(f"{os.getpid()} on ")
    assert f"taking over the stale lock {out / LOCK_NAME} of process {holder.pid}" in (
        capsys.readouterr().err
    )
    assert not (out / LOCK_NAME).exists()


@pytest.mark.parametrize("content", [b"", b"\xff\x00\xfe", b"   \n"])
def test_an_empty_or_unreadable_lock_is_taken_over_with_a_note(tmp_path, capsys, content):
    (tmp_path / LOCK_NAME).write_bytes(content)
    with claim_output(tmp_path, resume=False, overwrite=False):
        pass
    assert "empty or unreadable: its run ended before it could name itself" in (
        capsys.readouterr().err
    )


def test_a_full_disk_at_start_is_one_error_and_leaves_no_lock(tmp_path, monkeypatch, capsys):
    def disk_full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patched:
        patched.setattr(os, "pwrite", disk_full)
        full = pytest.raises(RunError, match=r"cannot write the lock file .*: the disk is full")
        with full, claim_output(tmp_path, resume=False, overwrite=False):
            pass
    assert not (tmp_path / LOCK_NAME).exists()
    (tmp_path / LOCK_NAME).write_bytes(b"")  # as a crash mid-write would leave it
    with claim_output(tmp_path, resume=False, overwrite=False):  # not wedged
        pass
    assert "taking over the lock" in capsys.readouterr().err
