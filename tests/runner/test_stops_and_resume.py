"""Stops and resumes: the same seed repeats bit for bit; SIGINT, SIGTERM or SIGKILL at any
point (before the first job, in training, in a validation, with worker processes) and --resume
end exactly as an uninterrupted run, TensorBoard included; a non-finite loss or a killed worker
is one line and keeps what was done (a lost torchrun rank: test_distributed.py)."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT
from run_records import (
    DRIVERS,
    FAULT_FEW_SHOT_MODEL,
    SYNTHETIC_TINY,
    alive,
    children,
    error_lines,
    logged_metrics,
    outcome,
    run_driver,
    stopped_at_call,
)

import msr
from experiments import few_shot, synthetic
from experiments.control import Stopped, deferred_stops, raise_if_stopped
from experiments.presets import FEW_SHOT as FEW_SHOT_PRESETS
from experiments.rundir import write_results
from msr import MAML, ProtoNet
from msr.models import conv4

pytestmark = pytest.mark.usefixtures("in_process")


def _without_wall(runs):
    return [{k: v for k, v in run.items() if k != "wall_s"} for run in runs]


def _synthetic(out, *options):
    """The Table 1 driver at the tiny preset, seed 2, with ``options`` after the defaults."""
    return [
        sys.executable,
        *("-m", "experiments.synthetic", "--preset", "tiny", "--seed", "2", "--out", str(out)),
        *options,
    ]


def _two_jobs(out, *options):
    return _synthetic(
        out, "--steps", "800", "--methods", "MAML-Conv", "MSR-FC", "--k", "1", *options
    )


def test_same_seed_gives_bit_identical_synthetic_results(tmp_path):
    runs = []
    for name in ("a", "b"):
        command = _synthetic(tmp_path / name, "--methods", "MSR-FC", "MAML-LC", "--k", "2")
        done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        runs.append(json.loads((tmp_path / name / "results.json").read_text())["runs"])
    assert _without_wall(runs[0]) == _without_wall(runs[1])
    assert logged_metrics(tmp_path / "a") == logged_metrics(tmp_path / "b")


STOPS = [
    (signal.SIGKILL, -signal.SIGKILL),
    (signal.SIGINT, 128 + signal.SIGINT),
]


def _checkpoint_step(path):
    try:
        return msr.saving.read(path)["metadata"]["step"]
    except (OSError, RuntimeError, EOFError):
        return -1


def _stop(process, signum, expected_status):
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == expected_status, err
    if signum != signal.SIGKILL:
        assert f"stopped by {signum.name}" in err and "--resume" in err and "Traceback" not in err


FEW_SHOT = [
    *(sys.executable, "-m", "experiments.few_shot", "--method", "maml", "--preset", "tiny"),
    *("--steps", "30", "--seed", "1"),
]

FEW_SHOT_MODEL = "maml_omniglot_5w1s_s1/model.pt"  # its job's model file and checkpoint

PROTONET_MODEL = "protonet_omniglot_5w1s_s0/model.pt"


def _uninterrupted(tmp_path_factory, command) -> Path:
    """Run ``command(out)`` to its end in a fresh ``out``; returns ``out``."""
    out = tmp_path_factory.mktemp("whole")
    done = subprocess.run(command(out), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def whole_few_shot(tmp_path_factory) -> Path:
    """The --out of an uninterrupted few-shot run, shared by the stop tests."""
    return _uninterrupted(tmp_path_factory, lambda out: [*FEW_SHOT, "--out", str(out)])


@pytest.fixture(scope="module")
def whole_synthetic(tmp_path_factory) -> Path:
    """The --out of an uninterrupted two-job synthetic run, shared by the stop tests."""
    return _uninterrupted(tmp_path_factory, _two_jobs)


@pytest.mark.parametrize("signum, expected_status", STOPS, ids=lambda v: str(v))
def test_stopped_midway_then_resume_ends_like_an_uninterrupted_run(
    tmp_path, signum, expected_status, whole_few_shot
):
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [*FEW_SHOT, "--out", str(killed)],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while _checkpoint_step(killed / FEW_SHOT_MODEL) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)  # the step-0 checkpoint is written first
    _stop(process, signum, expected_status)
    assert json.loads((killed / "results.json").read_text())["runs"] == []  # stopped midway
    stopped_at = msr.saving.read(killed / FEW_SHOT_MODEL)["metadata"]["step"]
    assert 0 < stopped_at < 30

    resumed = subprocess.run(
        [*FEW_SHOT, "--resume", "--out", str(killed)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((whole_few_shot / "results.json").read_text())
    b = json.loads((killed / "results.json").read_text())
    assert _without_wall(a["runs"]) == _without_wall(b["runs"])
    # Lines logged after the last checkpoint are dropped on resume and redone identically.
    assert logged_metrics(killed) == logged_metrics(whole_few_shot)


def test_non_finite_loss_stops_with_a_message_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    class Diverging(ProtoNet):
        calls = 0

        def meta_backward(self, tasks):
            Diverging.calls += 1
            losses = super().meta_backward(tasks)
            return losses * float("nan") if Diverging.calls == 3 else losses

    monkeypatch.setattr(
        few_shot,
        "build_learner",
        lambda method, channels, ways, cfg: Diverging(
            conv4(channels, cfg.image_size, cfg.hidden), ways
        ),
    )
    out = tmp_path / "nan"
    with pytest.raises(FloatingPointError, match="non-finite training loss nan at step 3"):
        few_shot.main(
            ["--method", "protonet", "--preset", "tiny", "--steps", "6", "--out", str(out)]
        )
    assert msr.saving.read(out / PROTONET_MODEL)["metadata"]["step"] == 2
    assert json.loads((out / "results.json").read_text())["runs"] == []


@pytest.mark.parametrize("signum, expected_status", STOPS, ids=lambda v: str(v))
def test_synthetic_stopped_midway_then_resume_ends_like_an_uninterrupted_run(
    tmp_path, signum, expected_status, whole_synthetic
):
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        _two_jobs(killed),
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = killed / "MSR-FC_k1_s2" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not _lines(metrics):
        time.sleep(0.01)
    _stop(process, signum, expected_status)
    # It really stopped inside the second job: the first is saved, the second only logged.
    partial = json.loads((killed / "results.json").read_text())
    assert [r["method"] for r in partial["runs"]] == ["MAML-Conv"]
    assert _lines(metrics) and not (metrics.parent / "result.json").exists()

    resumed = subprocess.run(
        _two_jobs(killed, "--resume"), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((whole_synthetic / "results.json").read_text())
    b = json.loads((killed / "results.json").read_text())
    assert _without_wall(a["runs"]) == _without_wall(b["runs"])
    assert b["runs"][0]["wall_s"] == partial["runs"][0]["wall_s"]  # kept, not rerun
    assert logged_metrics(killed) == logged_metrics(whole_synthetic)


def test_synthetic_resume_refuses_a_missing_summary_or_a_foreign_job(tmp_path):
    out = tmp_path / "run"
    missing = subprocess.run(
        _two_jobs(out, "--resume"), cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert missing.returncode == 2 and "results.json does not exist" in missing.stderr
    (out / "MAML-Conv_k1_s2").mkdir(parents=True)
    write_results(out / "results.json", {})
    identity = {"driver": "synthetic", "seed": 2, "preset": "quick", "config": {"steps": 800}}
    foreign_job = {"identity": identity, "result": {"steps": 800}}
    write_results(out / "MAML-Conv_k1_s2" / "result.json", foreign_job)
    foreign = subprocess.run(
        _two_jobs(out, "--resume"), cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert foreign.returncode == 2 and "belongs to another run" in foreign.stderr
    assert "MAML-Conv_k1_s2/result.json" in foreign.stderr
    assert "'preset': ('quick', 'tiny')" in foreign.stderr


def test_synthetic_non_finite_loss_stops_and_keeps_the_finished_runs(tmp_path, monkeypatch):
    from msr import MAML

    calls = 0
    original = MAML.meta_backward

    def diverging(self, tasks):
        nonlocal calls
        calls += 1
        losses = original(self, tasks)
        return losses * float("inf") if calls == 8 else losses  # 2nd job, 2nd step

    monkeypatch.setattr(MAML, "meta_backward", diverging)
    out = tmp_path / "inf"
    diverged = r"non-finite training loss inf at step 2 .*MSR-FC"
    with pytest.raises(FloatingPointError, match=diverged):
        synthetic.main(
            ["--preset", "tiny", "--methods", "MAML-Conv", "MSR-FC", "--k", "1", "--out", str(out)]
        )
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["method"] for r in runs] == ["MAML-Conv"]


def test_a_stop_waits_for_the_next_safe_point_and_a_second_one_does_not():
    """A signal landing inside torch (e.g. while vmap enters a level) must not raise there: it
    once turned a SIGTERM into an internal functorch error and exit status 1."""
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where the suite runs as a background job
    with deferred_stops():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler has run, and raised nothing here
        with pytest.raises(Stopped) as stop:
            raise_if_stopped()
        assert stop.value.signum == signal.SIGTERM
        with pytest.raises(Stopped) as again:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # interrupted at once
        assert again.value.signum == signal.SIGINT
    raise_if_stopped()  # outside, nothing is pending ...
    assert signal.getsignal(signal.SIGINT) is before  # ... and the handler restored


def test_a_stopped_few_shot_run_checkpoints_the_step_it_stopped_at(tmp_path, monkeypatch):
    """A stop (a cluster's preemption, say) loses no finished step, whatever the preset's
    checkpoint interval."""

    class SignalledAtStep5(ProtoNet):
        calls = 0

        def meta_backward(self, tasks):
            SignalledAtStep5.calls += 1
            if SignalledAtStep5.calls == 5:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().meta_backward(tasks)

    monkeypatch.setattr(
        few_shot,
        "build_learner",
        lambda method, channels, ways, cfg: SignalledAtStep5(
            conv4(channels, cfg.image_size, cfg.hidden), ways
        ),
    )
    tiny = FEW_SHOT_PRESETS["omniglot"]["tiny"]
    monkeypatch.setitem(FEW_SHOT_PRESETS["omniglot"], "tiny", replace(tiny, checkpoint_every=1000))
    out = tmp_path / "run"
    with deferred_stops(), pytest.raises(Stopped):
        few_shot.main(
            ["--method", "protonet", "--preset", "tiny", "--steps", "20", "--out", str(out)]
        )
    assert msr.saving.read(out / PROTONET_MODEL)["metadata"]["step"] == 5


def _lines(path):
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_stop_with_worker_processes_ends_them_at_once(tmp_path):
    out = tmp_path / "run"
    command = _synthetic(
        out, "--steps", "100000", "--methods", "MAML-Conv", "MSR-FC", "--k", "1", "--workers", "2"
    )
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    metrics = [out / job / "metrics.jsonl" for job in ("MAML-Conv_k1_s2", "MSR-FC_k1_s2")]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not all(map(_lines, metrics)):
        time.sleep(0.05)  # the workers are meta-training
    workers = children(process.pid)
    assert workers
    stopped_at = time.monotonic()
    _stop(process, signal.SIGTERM, 128 + signal.SIGTERM)
    assert time.monotonic() - stopped_at < 30  # not after the jobs (minutes each)
    deadline = time.monotonic() + 10
    while any(map(alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(alive, workers))
    assert json.loads((out / "results.json").read_text())["runs"] == []
    assert not (out / ".lock").exists()


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
    assert not (out / ".lock").exists()
    resumed = subprocess.run(
        [*command, "--resume"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    assert [r["method"] for r in json.loads((out / "results.json").read_text())["runs"]] == [
        "MSR-FC"
    ]


@pytest.mark.parametrize("name", DRIVERS)
def test_sigterm_during_training_then_resume(tmp_path, monkeypatch, capsys, name, reference):
    out = tmp_path / "run"
    half = reference[name]["steps"] // 2 + 1
    status = stopped_at_call(name, out, monkeypatch, torch.optim.Adam, "step", half)
    assert status == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in capsys.readouterr().err
    assert run_driver(name, out, "--resume") == 0
    assert outcome(out) == reference[name]["outcome"]


@pytest.mark.parametrize("name", DRIVERS)
def test_sigterm_during_validation_then_resume(tmp_path, monkeypatch, capsys, name, reference):
    """few_shot validates in chunks (tiny: 8 tasks in 4 chunks), so the stop lands inside a
    validation: the trained step is checkpointed and validated when the run resumes (before,
    the checkpoint stayed at the previous ``checkpoint_every``). The others stop at the next
    step."""
    out = tmp_path / "run"
    last_validation = reference[name]["evaluations"] // 2 + 1
    if name == "few_shot":  # 2 validations of 4 chunks, then the test: stop in the second
        last_validation = 5
    status = stopped_at_call(name, out, monkeypatch, MAML, "evaluate", last_validation)
    assert status == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in capsys.readouterr().err
    if name == "few_shot":
        saved = msr.saving.read(out / FAULT_FEW_SHOT_MODEL)["metadata"]
        assert saved["step"] == 4 and saved["unvalidated"] is not None
        assert [r["step"] for r in logged_metrics(out)] == [2]
    assert run_driver(name, out, "--resume") == 0
    assert outcome(out) == reference[name]["outcome"]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_tensorboard_shows_each_step_once_after_a_kill_and_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    options = [*SYNTHETIC_TINY, "--steps", "200", "--tensorboard", "--out", str(out)]
    options += ["--set", "eval_every=10", "checkpoint_every=50", "test_tasks=2"]
    command = [sys.executable, "-m", "experiments.synthetic", *options]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True)
    metrics, deadline = out / "MSR-FC_k1_s0" / "metrics.jsonl", time.monotonic() + 200
    while time.monotonic() < deadline:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if lines and json.loads(lines[-1])["step"] >= 70:  # past the checkpoint at 50
            break
        time.sleep(0.02)
    process.kill()
    process.communicate()
    assert 7 <= len(metrics.read_text().splitlines()) < 20  # killed midway
    resumed = subprocess.run(
        [*command, "--resume"], cwd=REPO_ROOT, capture_output=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    (job,) = [p for p in (out / "tensorboard").rglob("*") if any(p.glob("events.*"))]
    events = EventAccumulator(str(job))
    events.Reload()
    steps = [event.step for event in events.Scalars("train/loss")]
    assert steps == list(range(10, 201, 10))  # before: 60 and 70 twice


def _synthetic_command(out, *options):
    return [sys.executable, "-m", "experiments.synthetic", *SYNTHETIC_TINY, "--out", str(out),
            *options]  # fmt: skip


def test_a_non_finite_training_loss_is_one_line(tmp_path):
    """An inner lr the parser takes as positive and finite, but whose softplus underflows."""
    done = subprocess.run(
        _synthetic_command(tmp_path / "run", "--inner-lr", "1e-320"),
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1
    (line,) = error_lines(done.stderr)
    assert "not finite" in line or "non-finite" in line


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc")
def test_a_killed_worker_process_is_one_line(tmp_path):
    out = tmp_path / "run"
    command = _synthetic_command(out, "--steps", "100000", "--methods", "MAML-Conv", "MSR-FC")
    process = subprocess.Popen(
        [*command, "--workers", "2"], cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True
    )
    deadline, workers = time.monotonic() + 120, []
    while time.monotonic() < deadline and not list(out.glob("*/metrics.jsonl")):
        time.sleep(0.05)
    workers = [p for p in children(process.pid) if b"spawn_main" in _cmdline(p)]
    assert workers
    os.kill(workers[0], signal.SIGKILL)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 1
    (line,) = error_lines(err)
    assert "a worker process died" in line and "--resume" in line


def _cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
