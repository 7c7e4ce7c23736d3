"""End to end: the few-shot driver on real Omniglot, tiny preset, with checkpoints and resume."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT
from run_records import driver_status

from experiments import few_shot
from experiments.few_shot import METHODS, PRESETS, build_learner, count_parameters


def _run(*args, check=True):
    done = subprocess.run(
        [sys.executable, "-m", "experiments.few_shot", *map(str, args)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


def test_tiny_run_then_resume_equals_an_uninterrupted_run(tmp_path, capsys, monkeypatch):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    done = _run("--method", "msr", "--preset", "tiny", "--device", "cpu", "--out", whole)
    assert "msr on Aug-omniglot 5-way 1-shot" in done.stdout and "paper 95.3" in done.stdout
    _run("--method", "msr", "--preset", "tiny", "--steps", "2", "--out", parts)
    capsys.readouterr()
    # the refusals in this process (the same run_cli as the command's, no interpreter to start;
    # the driver's malloc tuning left out, as it would stay with the test process)
    monkeypatch.setattr(few_shot, "keep_freed_memory", lambda: False)
    refused = ["--method", "msr", "--preset", "tiny", "--out", str(parts)]
    assert driver_status(few_shot.main, "experiments.few_shot", refused) == 2
    assert "pass --resume" in capsys.readouterr().err
    other = ["--method", "maml", "--preset", "tiny", "--resume", "--out", str(parts)]
    assert driver_status(few_shot.main, "experiments.few_shot", other) == 2
    err = capsys.readouterr().err
    assert "belongs to another run" in err and "{'run.method': ('msr', 'maml')}" in err
    _run("--method", "msr", "--preset", "tiny", "--resume", "--out", parts)
    a = json.loads((whole / "results.json").read_text())
    b = json.loads((parts / "results.json").read_text())
    assert a["accuracy"] == b["accuracy"] and a["ci95"] == b["ci95"]
    assert a["paper_accuracy"] == 95.3 and a["chance"] == 20.0 and a["steps"] == 4
    assert a["test_tasks"] == 4 and a["torch_version"] == torch.__version__
    assert a["device"] == b["device"] == "cpu"  # --device cpu, and auto on a CPU-only machine
    lines = [json.loads(x) for x in (parts / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4]
    assert (whole / "checkpoint.pt").exists()
    saved = torch.load(whole / "model_msr_5w1s.pt", weights_only=True)
    assert saved["driver"] == "few_shot" and saved["tags"]["method"] == "msr"
    assert (
        saved["state_dict"].keys()
        == build_learner("msr", 1, 5, PRESETS["omniglot"]["tiny"]).state_dict().keys()
    )


@pytest.mark.parametrize("method", [m for m in METHODS if m != "msr"])
def test_every_method_trains_through_the_cli(tmp_path, method):
    done = _run("--method", method, "--preset", "tiny", "--ways", "3", "--out", tmp_path)
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["method"] == method and result["ways"] == 3
    assert result["paper_accuracy"] is None  # the paper has no 3-way column
    assert 0 <= result["accuracy"] <= 100 and "paper n/a" in done.stdout


def test_maml_big_has_at_least_msrs_meta_parameters():
    cfg = PRESETS["omniglot"]["cpu"]
    big = count_parameters(build_learner("maml-big", 1, 5, cfg))
    msr = count_parameters(build_learner("msr", 1, 5, cfg))
    plain = count_parameters(build_learner("maml", 1, 5, cfg))
    assert plain < msr <= big < msr * 1.1


def test_miniimagenet_needs_a_data_path(tmp_path):
    done = _run("--dataset", "miniimagenet", "--method", "maml", "--out", tmp_path, check=False)
    assert done.returncode == 2 and "--data is required for miniimagenet" in done.stderr


def test_torchrun_is_refused_rather_than_two_runs_racing_for_one_out(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as stop:
        few_shot.main(["--method", "maml", "--preset", "tiny", "--out", str(tmp_path / "run")])
    assert stop.value.code == 2
    assert "does not join a torchrun process group" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
