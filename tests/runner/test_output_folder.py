"""An --out is held by exactly one run and holds only its own files: a live holder refuses the
others, whatever number start at once; a lock whose run ended (killed, or on a full disk before
it could name itself) is taken over with a note and never wedges the directory; a run follows
no link inside --out, removes only a run's files, clears the temporaries of a killed write, never
replaces an earlier run unless told (--resume, --overwrite, and not with bad input), and writes
its files under the umask."""

import errno
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import REPO_ROOT
from run_records import (
    BAD_INPUT,
    DRIVERS,
    SYNTHETIC_ARGS,
    SYNTHETIC_TINY,
    Counter,
    driver_status,
    errors_since,
    files_in,
    one_line,
    one_line_error,
    outcome,
    run_driver,
    run_module,
    run_synthetic,
    succeeds,
)

import msr
from experiments import redraw, synthetic
from experiments.control import RunError
from experiments.rundir import claim_output

LOCK = ".lock"  # the lock file in --out (docs/running.md: DIR/.lock)

pytestmark = pytest.mark.usefixtures("in_process")


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
        (out / LOCK).write_text(f"{_ended_pid()} {os.uname().nodename}\n")
        rounds.append(out)
    start = time.time() + 3.0  # every process started and waiting by then
    claimers = [_claimers(out, 6, start, hold=1.0) for out in rounds]
    for out, processes in zip(rounds, claimers, strict=True):
        outputs = [process.communicate(timeout=60) for process in processes]
        said = [stdout.strip() for stdout, _ in outputs]
        assert sum(line == "won" for line in said) == 1, (said, [err for _, err in outputs])
        refused = [line for line in said if line != "won"]
        assert all(line.startswith("refused:") and "is in use by" in line for line in refused)
        assert not (out / LOCK).exists()  # the winner removed it at its end


def test_a_live_lock_refuses_naming_its_holder_and_a_dead_ones_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    (holder,) = _claimers(out, 1, time.time(), hold=30.0)
    assert holder.stdout.readline().strip() == "won"
    busy = pytest.raises(RunError, match=rf"is in use by process {holder.pid} on ")
    with busy, claim_output(out, resume=False, overwrite=False):
        pass
    holder.kill()  # SIGKILL: no clean-up, the lock file stays
    holder.wait()
    assert (out / LOCK).read_text().startswith(f"{holder.pid} on ")
    with claim_output(out, resume=False, overwrite=False):
        assert (out / LOCK).read_text().startswith(f"{os.getpid()} on ")
    assert f"taking over the stale lock {out / LOCK} of process {holder.pid}" in (
        capsys.readouterr().err
    )
    assert not (out / LOCK).exists()


@pytest.mark.parametrize("content", [b"", b"\xff\x00\xfe", b"   \n"])
def test_an_empty_or_unreadable_lock_is_taken_over_with_a_note(tmp_path, capsys, content):
    (tmp_path / LOCK).write_bytes(content)
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
    assert not (tmp_path / LOCK).exists()
    (tmp_path / LOCK).write_bytes(b"")  # as a crash mid-write would leave it
    with claim_output(tmp_path, resume=False, overwrite=False):  # not wedged
        pass
    assert "taking over the lock" in capsys.readouterr().err


def _claim(out, resume=False, overwrite=False):
    with claim_output(out, resume, overwrite):
        pass


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_untouched(tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("mine\n")
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).symlink_to(precious)
    with pytest.raises(RunError, match="is a symbolic link"):
        _claim(out)
    assert precious.read_text() == "mine\n" and (out / LOCK).is_symlink()


def test_a_dangling_lock_link_ends_the_start_within_seconds(tmp_path):
    """It spun at full CPU for over 600 s (O_EXCL saw the link, the plain open found nothing)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).symlink_to(tmp_path / "nowhere")
    claim = "import sys; from pathlib import Path; from experiments.rundir import claim_output\n"
    claim += "with claim_output(Path(sys.argv[1]), False, False): pass"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", claim, str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert time.monotonic() - started < 30
    assert done.returncode != 0 and "is a symbolic link" in done.stderr
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("name", ["results.json", "curve_x.png", "job/metrics.jsonl"])
def test_a_link_where_a_run_writes_is_refused(tmp_path, name):
    out = tmp_path / "run"
    (out / "job").mkdir(parents=True)
    (out / name).symlink_to(tmp_path / "outside")  # dangling: a write would create it
    with pytest.raises(RunError, match=f"{name} is a symbolic link"):
        _claim(out, resume=True)
    assert not (tmp_path / "outside").exists()


def test_a_job_folder_that_is_a_link_is_refused(tmp_path, capsys):
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    (out / "MSR-FC_k1_s0").symlink_to(elsewhere)
    assert driver_status(synthetic.main, "synthetic", [*SYNTHETIC_TINY, "--out", str(out)]) == 2
    assert "MSR-FC_k1_s0 is a symbolic link" in capsys.readouterr().err
    assert list(elsewhere.iterdir()) == []


def test_a_link_inside_the_tensorboard_tree_is_refused(tmp_path):
    out = tmp_path / "run"
    (out / "tensorboard" / "job").mkdir(parents=True)
    (out / "tensorboard" / "job" / "events").symlink_to(tmp_path / "outside")
    with pytest.raises(RunError, match="events is a symbolic link"):
        _claim(out, resume=True)


def test_overwrite_removes_only_the_run_and_refuses_a_file_of_yours_in_a_job_folder(
    tmp_path, capsys
):
    out = tmp_path / "run"
    assert driver_status(synthetic.main, "synthetic", [*SYNTHETIC_TINY, "--out", str(out)]) == 0
    job = out / "MSR-FC_k1_s0"
    assert {p.name for p in job.iterdir()} == {"metrics.jsonl", "model.pt", "result.json", "U.png"}
    beside, inside = [out / "model_mine.pt", out / "figures" / "a.png"], job / "notes.txt"
    beside[1].parent.mkdir()
    for path in [*beside, inside]:
        path.write_text("mine")
    capsys.readouterr()
    again = [*SYNTHETIC_TINY, "--out", str(out), "--overwrite"]
    assert driver_status(synthetic.main, "synthetic", again) == 2
    assert "MSR-FC_k1_s0/notes.txt, which no run writes" in capsys.readouterr().err
    assert all(path.read_text() == "mine" for path in [*beside, inside])  # nothing was removed
    assert (job / "model.pt").exists()
    inside.unlink()
    before = (job / "model.pt").stat().st_mtime_ns
    assert driver_status(synthetic.main, "synthetic", again) == 0
    assert (job / "model.pt").stat().st_mtime_ns != before  # replaced
    assert all(path.read_text() == "mine" for path in beside)  # yours, beside the run: kept


def test_an_out_of_the_layout_before_job_folders_is_refused_by_resume_and_overwrite(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("results.json", "metrics.jsonl", "model_MSR-FC_k1_s0.pt"):
        (out / name).write_text("{}")
    for flags in ({"resume": True}, {"overwrite": True}):
        with pytest.raises(RunError, match=r"holds metrics\.jsonl: a run folder of msr before"):
            _claim(out, **flags)
    assert sorted(os.listdir(out)) == ["metrics.jsonl", "model_MSR-FC_k1_s0.pt", "results.json"]


def test_temporary_files_of_a_killed_write_are_removed_at_the_next_start(tmp_path):
    out = tmp_path / "run"
    (out / "job").mkdir(parents=True)
    (out / "job" / "metrics.jsonl").write_text("")
    (out / "job" / ".model.pt.a8_x.tmp").write_text("half a file")
    (out / ".results.json.k3j2_x.tmp").write_text("half a file")
    (out / ".notes.tmp").write_text("yours")
    _claim(out, resume=True)
    assert sorted(os.listdir(out)) == [".notes.tmp", "job"]
    assert os.listdir(out / "job") == ["metrics.jsonl"]


def test_a_rename_is_followed_by_a_sync_of_its_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def fsync(descriptor):
        synced.append(stat.S_ISDIR(os.fstat(descriptor).st_mode))
        real(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    msr.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), tmp_path / "model.pt")
    assert synced == [False, True]  # the file, then its folder


def test_a_second_run_into_a_finished_out_is_refused_unless_resumed_or_overwritten(tmp_path):
    out = tmp_path / "run"
    assert run_synthetic(out).returncode == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    line = one_line_error(run_module("experiments.rotation", "--group", "c8", "--out", out))
    assert str(out) in line and "--resume" in line and "--overwrite" in line
    assert "another --out" in line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # untouched
    replaced = run_module("experiments.rotation", "--group", "c8", "--methods", "MAML-Conv",
                    "--protocols", "paper", "--out", out, "--overwrite")  # fmt: skip
    assert replaced.returncode == 0, replaced.stderr
    assert not list(out.glob("*MSR-FC*")) and (out / "MAML-Conv_c8_paper_s0" / "model.pt").exists()
    both = run_synthetic(out, "--resume", "--overwrite")
    assert "pick one" in one_line_error(both)


def test_few_shot_refuses_a_non_empty_out_too(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    done = run_module("experiments.few_shot", "--method", "maml", "--out", tmp_path)
    assert "already holds a run (results.json)" in one_line_error(done)


def test_an_out_that_cannot_be_created_is_one_line(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    line = one_line_error(run_synthetic(file / "run"))
    assert f"cannot create --out {file / 'run'}: Not a directory" in line


def test_out_naming_a_file_is_one_line(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    assert "is a file, not a directory" in one_line_error(run_synthetic(file))
    assert file.read_text() == "mine"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_follow_the_umask(tmp_path, umask):
    out = tmp_path / "run"
    assert run_synthetic(out, umask=umask).returncode == 0
    expected = 0o666 & ~umask
    job = ("MSR-FC_k1_s0/" + name for name in ("metrics.jsonl", "model.pt", "result.json", "U.png"))
    for name in ("results.json", *job):
        assert stat.S_IMODE((out / name).stat().st_mode) == expected, name


@pytest.mark.parametrize(
    "arguments, replaces",
    [
        ((), True),
        (("--preset", "tiny"), True),
        (("--out", "runs/mine"), False),
        (("--out=runs/mine",), False),
        (("--resume",), False),
    ],
)
def test_the_main_script_replaces_only_its_own_demo_directory(tmp_path, arguments, replaces):
    """scripts/main.sh can be run again (README's first command), but never passes --overwrite
    to an --out the user chose, nor beside --resume; its own demo run of the layout before job
    folders, which --overwrite refuses, it removes first."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "main.sh").write_text((REPO_ROOT / "scripts" / "main.sh").read_text())
    (scripts / "venv.sh").write_text(f"PY=echo; cd {tmp_path}\n")  # the command line, printed
    old = tmp_path / "runs" / "synthetic-quick"  # its demo run, of the layout before job folders
    old.mkdir(parents=True)
    (old / "metrics.jsonl").write_text("")
    done = subprocess.run(
        ["bash", str(scripts / "main.sh"), *arguments], capture_output=True, text=True, check=True
    )
    command = done.stdout.split()
    assert command[:5] == ["-m", "experiments.synthetic", "--preset", "quick", "--out"]
    assert ("--overwrite" in command) == replaces
    assert command[len(command) - len(arguments) :] == list(arguments)  # passed on, last
    assert old.exists() != replaces  # only the demo run it replaces is removed


def test_a_tensorboard_link_to_nowhere_is_one_line(tmp_path, capsys):
    out, nowhere = tmp_path / "run", tmp_path / "unmounted" / "board"
    argv = (*SYNTHETIC_ARGS, "--out", str(out), "--tensorboard")
    succeeds(capsys, "synthetic", *argv)
    board = out / "tensorboard"
    assert board.is_dir()
    shutil.rmtree(board)  # its runs (one folder per job) gone with it
    board.symlink_to(nowhere)
    line = one_line(capsys, "synthetic", *argv, "--resume")
    assert f"{board} is a symbolic link (to {nowhere}): a run follows no link" in line
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "tensorboard").symlink_to(nowhere)
    for flags in ([], ["--overwrite"]):  # the link is seen, never followed nor replaced
        line = one_line(
            capsys, "synthetic", *SYNTHETIC_ARGS, "--out", str(fresh), "--tensorboard", *flags
        )
        assert "tensorboard is a symbolic link" in line
    assert (fresh / "tensorboard").is_symlink() and not nowhere.exists()


@pytest.mark.parametrize("name", DRIVERS)
def test_a_second_start_on_a_running_out_is_refused(tmp_path, monkeypatch, capsys, name, reference):
    out = tmp_path / "run"
    second = {}

    def start_again():
        with monkeypatch.context() as inner:  # the second start, while the first holds --out
            inner.setattr(torch.optim.Adam, "step", original_step)
            second["status"] = run_driver(name, out, "--resume")

    original_step = torch.optim.Adam.step
    counter = Counter(reference[name]["steps"] // 2 + 1, start_again)
    monkeypatch.setattr(torch.optim.Adam, "step", counter.wrap(original_step))
    assert run_driver(name, out) == 0
    [line] = errors_since(capsys)
    assert second["status"] == 2 and f"is in use by process {os.getpid()}" in line
    assert outcome(out) == reference[name]["outcome"]  # the first run went on undisturbed


@pytest.mark.parametrize(
    "name, bad", [(n, b) for n, bads in BAD_INPUT.items() for b in bads], ids=str
)
def test_overwrite_with_bad_input_keeps_the_earlier_run(tmp_path, capsys, name, bad):
    """Arguments and data are checked before --overwrite removes anything (before, the
    few-shot driver removed the finished run and then failed on a mistyped --data)."""
    earlier = {"results.json": b"{}", "x_s0/metrics.jsonl": b"", "x_s0/model.pt": b"the model"}
    (tmp_path / "x_s0").mkdir()
    for file, content in earlier.items():
        (tmp_path / file).write_bytes(content)
    assert run_driver(name, tmp_path, "--overwrite", *bad) == 2
    assert len(errors_since(capsys)) == 1
    assert files_in(tmp_path) == earlier


def test_redraw_refuses_a_run_that_is_still_going(tmp_path, capsys):

    out = tmp_path / "run"
    options = [*SYNTHETIC_TINY, "--out", str(out)]
    assert driver_status(synthetic.main, "synthetic", [*options, "--steps", "2"]) == 0
    saved = msr.saving.read(out / "MSR-FC_k1_s0" / "model.pt")["metadata"]
    assert saved["step"] == saved["config"]["steps"]
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(
            """
            import sys, time
            from pathlib import Path
            from experiments.rundir import claim_output
            with claim_output(Path(sys.argv[1]), True, False):
                print("holding", flush=True)
                time.sleep(60)
            """
        ), str(out)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "holding"
        capsys.readouterr()
        assert driver_status(redraw.main, "redraw", [str(out)]) == 2
        assert f"is in use by process {holder.pid} on " in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert driver_status(redraw.main, "redraw", [str(out)]) == 0
