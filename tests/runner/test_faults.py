"""Misuse and faults: earlier runs are never replaced silently, bad files give one line, code in
a checkpoint never runs, a failed write keeps the previous file, outputs follow the umask.
(Stops by SIGINT / SIGTERM / SIGKILL and --resume: test_long_runs.py.)"""

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT
from run_records import driver_status, logged_metrics

from experiments import cli, synthetic
from experiments.control import WriteFailedError, run_cli
from experiments.rundir import LOCK_NAME
from experiments.runfiles import MetricsLog, atomic_write


def _run(module, *arguments, umask=None):
    return subprocess.run(
        [sys.executable, "-m", module, "--preset", "tiny", *map(str, arguments)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=None if umask is None else (lambda: os.umask(umask)),
    )


def _synthetic(out, *more, umask=None):
    arguments = ("--methods", "MSR-FC", "--k", "1", "--out", out, *more)
    return _run("experiments.synthetic", *arguments, umask=umask)


@pytest.fixture
def synthetic_here(monkeypatch, capsys):
    """``_synthetic`` in this process (no interpreter and torch to start): a
    ``CompletedProcess`` of its status and stderr. The driver's malloc tuning is left out, as
    it would stay with the test process."""
    monkeypatch.setattr(cli, "reuse_freed_memory", lambda: False)

    def run(out, *more):
        argv = ["--preset", "tiny", "--methods", "MSR-FC", "--k", "1", "--out", str(out), *more]
        status = driver_status(synthetic.main, "experiments.synthetic", argv)
        return subprocess.CompletedProcess(argv, status, "", capsys.readouterr().err)

    return run


def _one_line_error(done, status=2):
    """The command failed with ``status`` and one line of error, no traceback."""
    assert done.returncode == status, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    return errors[0]


def test_a_second_run_into_a_finished_out_is_refused_unless_resumed_or_overwritten(tmp_path):
    out = tmp_path / "run"
    assert _synthetic(out).returncode == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    line = _one_line_error(_run("experiments.rotation", "--group", "c8", "--out", out))
    assert str(out) in line and "--resume" in line and "--overwrite" in line
    assert "another --out" in line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # untouched
    replaced = _run("experiments.rotation", "--group", "c8", "--methods", "MAML-Conv",
                    "--protocols", "paper", "--out", out, "--overwrite")  # fmt: skip
    assert replaced.returncode == 0, replaced.stderr
    assert not list(out.glob("*MSR-FC*")) and (out / "MAML-Conv_c8_paper_s0" / "model.pt").exists()
    both = _synthetic(out, "--resume", "--overwrite")
    assert "pick one" in _one_line_error(both)


def test_few_shot_refuses_a_non_empty_out_too(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    done = _run("experiments.few_shot", "--method", "maml", "--out", tmp_path)
    assert "already holds a run (results.json)" in _one_line_error(done)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (("--data", "/nonexistent"), "/nonexistent is neither an Omniglot .npz file nor"),
        (("--ways", "5000"), "ways=5000 exceeds the 48 classes available"),
        (("--shots", "50"), "shots + queries = 52 exceeds the 20 images per class"),
    ],
)
def test_few_shot_data_that_cannot_serve_the_run_is_one_line_before_any_write(
    tmp_path, arguments, message
):
    done = _run("experiments.few_shot", "--method", "maml", "--out", tmp_path, *arguments)
    assert message in _one_line_error(done)
    assert list(tmp_path.iterdir()) == []  # nothing written: the same --out can be used again


def test_an_out_that_cannot_be_created_is_one_line(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    line = _one_line_error(_synthetic(file / "run"))
    assert f"cannot create --out {file / 'run'}: Not a directory" in line


def test_out_naming_a_file_is_one_line(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    assert "is a file, not a directory" in _one_line_error(_synthetic(file))
    assert file.read_text() == "mine"


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "is not a readable JSON file"),
        ('{"seeds": [0]}', "is not a results file of these drivers"),
    ],
)
def test_a_corrupt_job_result_on_resume_is_one_line(tmp_path, content, message, synthetic_here):
    assert synthetic_here(tmp_path, "--steps", "2").returncode == 0
    (result := tmp_path / "MSR-FC_k1_s0" / "result.json").write_text(content)
    line = _one_line_error(synthetic_here(tmp_path, "--steps", "2", "--resume"))
    assert str(result) in line and message in line


def test_a_corrupt_metrics_file_on_resume_is_one_line(tmp_path, synthetic_here):
    out = tmp_path / "run"
    assert synthetic_here(out, "--steps", "3").returncode == 0
    job = out / "MSR-FC_k1_s0"
    (job / "result.json").unlink()  # as if the job had not finished: resume reads its log
    with (job / "metrics.jsonl").open("a") as log:
        log.write("{truncated\n")
    line = _one_line_error(synthetic_here(out, "--steps", "3", "--resume"))
    assert f"{job / 'metrics.jsonl'}, line 2: not a JSON record" in line


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, synthetic_here):
    """A stop or a full disk in the middle of an append leaves a line without its newline."""
    out = tmp_path / "run"
    assert synthetic_here(out, "--steps", "3").returncode == 0
    job = out / "MSR-FC_k1_s0"
    finished = logged_metrics(job / "metrics.jsonl")
    (job / "result.json").unlink()  # as if the job had been cut off: its scoring is redone
    with (job / "metrics.jsonl").open("a") as log:
        log.write('{"method": "MSR-FC", "k": 1, "seed": 0, "step"')
    resumed = synthetic_here(out, "--steps", "3", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "dropping its torn last line" in resumed.stderr
    assert logged_metrics(job / "metrics.jsonl") == finished


def test_a_metrics_append_on_a_full_disk_says_so():
    log = MetricsLog(Path("/dev/full"))  # every write to it fails with ENOSPC
    with pytest.raises(WriteFailedError, match=r"/dev/full: the disk is full; the records before"):
        log.write(step=1, loss=0.5)
    log.close()  # nothing left in a buffer to fail again


class _RunsCode:
    """Unpickling this calls os.system: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("kind", ["code", "garbage", "foreign"])
def test_checkpoints_load_without_running_code_and_bad_ones_are_one_line(
    tmp_path, kind, synthetic_here
):
    assert synthetic_here(tmp_path, "--steps", "2").returncode == 0
    checkpoint, marker = tmp_path / "MSR-FC_k1_s0" / "model.pt", tmp_path / "pwned"
    if kind == "code":
        torch.save({"run": _RunsCode(marker)}, checkpoint)
        torch.load(checkpoint, weights_only=False)  # the crafted file does run code if trusted
        assert marker.exists()
        marker.unlink()
    elif kind == "garbage":
        checkpoint.write_bytes(b"\x00 not a checkpoint")
    else:
        torch.save({"weights": torch.zeros(2)}, checkpoint)
    done = synthetic_here(tmp_path, "--resume")  # 2 of the preset's 6 steps: resumes from it
    line = _one_line_error(done)
    assert str(checkpoint) in line
    expected = {
        "code": "cannot be loaded safely: Trying to load unsupported GLOBAL posix.system",
        "garbage": "is not a torch file (it begins with",
        "foreign": "holds no checksum",
    }[kind]
    assert expected in line and "weights_only` set to `False" not in line
    assert not marker.exists()  # nothing ran


@pytest.mark.parametrize("name", ["results.json", "checkpoint.pt"])
def test_a_failed_write_keeps_the_previous_file_and_says_so(tmp_path, capsys, name):
    path = tmp_path / name
    atomic_write(path, lambda stream: stream.write(b"the previous version"))

    def disk_full(stream):
        stream.write(b"half of the new ")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(WriteFailedError, match=rf"the disk is full; the previous {name} is"):
        atomic_write(path, disk_full)
    assert path.read_bytes() == b"the previous version"
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left

    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: atomic_write(path, disk_full), "experiments.synthetic")
    assert stop.value.code == 1
    assert "could not write" in capsys.readouterr().err


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_follow_the_umask(tmp_path, umask):
    out = tmp_path / "run"
    assert _synthetic(out, umask=umask).returncode == 0
    expected = 0o666 & ~umask
    job = ("MSR-FC_k1_s0/" + name for name in ("metrics.jsonl", "model.pt", "result.json", "U.png"))
    for name in ("results.json", *job):
        assert stat.S_IMODE((out / name).stat().st_mode) == expected, name


def test_a_run_stopped_before_its_first_job_ends_can_be_resumed(tmp_path):
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "experiments.synthetic", "--preset", "tiny", "--steps", "2000",
        "--methods", "MSR-FC", "--k", "1", "--out", str(out),
    ]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not (out / "results.json").exists() and time.monotonic() < deadline:
        time.sleep(0.02)  # written, with no runs, before the first job starts
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert json.loads((out / "results.json").read_text())["runs"] == []
    assert not (out / LOCK_NAME).exists()
    resumed = subprocess.run(
        [*command, "--resume"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    assert [r["method"] for r in json.loads((out / "results.json").read_text())["runs"]] == [
        "MSR-FC"
    ]


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
    to an --out the user chose, nor beside --resume."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "main.sh").write_text((REPO_ROOT / "scripts" / "main.sh").read_text())
    (scripts / "venv.sh").write_text("PY=echo\n")  # the driver's command line, printed
    done = subprocess.run(
        ["bash", str(scripts / "main.sh"), *arguments], capture_output=True, text=True, check=True
    )
    command = done.stdout.split()
    assert command[:5] == ["-m", "experiments.synthetic", "--preset", "quick", "--out"]
    assert ("--overwrite" in command) == replaces
    assert command[len(command) - len(arguments) :] == list(arguments)  # passed on, last
