"""Long-run safety: bit-identical reruns, SIGKILL then --resume, and NaN stops."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from experiments import few_shot
from experiments.common import REPO_ROOT
from msr import ProtoNet


def _metrics(path):
    return [
        {k: v for k, v in json.loads(line).items() if k != "elapsed_s"}
        for line in path.read_text().splitlines()
    ]


def test_same_seed_gives_bit_identical_synthetic_results(tmp_path):
    runs = []
    for name in ("a", "b"):
        command = [
            sys.executable,
            "-m",
            "experiments.synthetic",
            "--preset",
            "tiny",
            "--methods",
            "MSR-FC",
            "MAML-LC",
            "--k",
            "2",
            "--seed",
            "4",
            "--out",
            str(tmp_path / name),
        ]
        done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        runs.append(json.loads((tmp_path / name / "results.json").read_text())["runs"])
    strip = lambda rs: [{k: v for k, v in r.items() if k != "wall_s"} for r in rs]  # noqa: E731
    assert strip(runs[0]) == strip(runs[1])
    assert _metrics(tmp_path / "a" / "metrics.jsonl") == _metrics(tmp_path / "b" / "metrics.jsonl")


def test_sigkill_midway_then_resume_ends_like_an_uninterrupted_run(tmp_path):
    base = [
        sys.executable,
        "-m",
        "experiments.few_shot",
        "--method",
        "maml",
        "--preset",
        "tiny",
        "--steps",
        "30",
        "--seed",
        "1",
    ]
    whole = subprocess.run(
        [*base, "--out", str(tmp_path / "whole")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert whole.returncode == 0, whole.stderr

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [*base, "--out", str(killed)],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not (killed / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "results.json").exists()  # it really stopped midway
    stopped_at = torch.load(killed / "checkpoint.pt", weights_only=False)["step"]
    assert 0 < stopped_at < 30

    resumed = subprocess.run(
        [*base, "--resume", "--out", str(killed)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((tmp_path / "whole" / "results.json").read_text())
    b = json.loads((killed / "results.json").read_text())
    assert (a["accuracy"], a["ci95"]) == (b["accuracy"], b["ci95"])
    # Lines logged after the last checkpoint are dropped on resume and redone identically.
    assert _metrics(killed / "metrics.jsonl") == _metrics(tmp_path / "whole" / "metrics.jsonl")


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
            few_shot.conv4(channels, cfg.image_size, cfg.hidden), ways
        ),
    )
    out = tmp_path / "nan"
    with pytest.raises(RuntimeError, match="non-finite training loss nan at step 3"):
        few_shot.main(
            ["--method", "protonet", "--preset", "tiny", "--steps", "6", "--out", str(out)]
        )
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 2
    assert not (out / "results.json").exists()
