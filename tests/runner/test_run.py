"""The one meta-training loop: steps in order, a stop taken between steps after ``on_stop``
has kept the finished ones, and a diverged loss named with its step; the minimal experiment of
the architecture guide runs as printed."""

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT
from torch import nn

from experiments.cli import with_settings
from experiments.control import Stopped, deferred_stops
from experiments.presets import FEW_SHOT, SYNTHETIC, RunConfig
from experiments.run import outer_groups, outer_steps
from msr import MAML, MSRLinear, NonFiniteLossError, TaskBatch


def _setup():
    maml = MAML(nn.Linear(3, 1), F.mse_loss, inner_steps=1)
    optimizer = torch.optim.Adam(maml.parameters(), lr=1e-2)

    def meta_batch(step):
        generator = torch.Generator().manual_seed(step)
        x = torch.randn(2, 4, 3, generator=generator)
        return TaskBatch(x, x.sum(-1, keepdim=True), x, x.sum(-1, keepdim=True))

    return maml, optimizer, meta_batch


def test_steps_run_in_order_and_the_loss_falls():
    maml, optimizer, meta_batch = _setup()
    losses = dict(outer_steps(maml, optimizer, meta_batch, range(1, 31), what="t", kept="k"))
    assert list(losses) == list(range(1, 31)) and losses[30] < losses[1]


def test_a_stop_keeps_the_finished_steps_then_raises():
    maml, optimizer, meta_batch = _setup()
    kept, seen = [], []
    with deferred_stops(), pytest.raises(Stopped) as stop:
        for step, _ in outer_steps(
            maml, optimizer, meta_batch, range(1, 10), what="t", kept="k", on_stop=kept.append
        ):
            seen.append(step)
            if step == 3:
                os.kill(os.getpid(), signal.SIGTERM)  # noted; taken before step 4
    assert stop.value.signum == signal.SIGTERM and seen == [1, 2, 3] and kept == [3]


def test_a_non_finite_loss_names_the_step_and_what_is_kept():
    maml, optimizer, meta_batch = _setup()

    def diverging(step):
        tasks = meta_batch(step)
        return tasks._replace(y_query=tasks.y_query * (float("inf") if step == 2 else 1.0))

    with pytest.raises(NonFiniteLossError, match=r"loss inf at step 2 \(the job\); all is kept"):
        for _ in outer_steps(
            maml, optimizer, diverging, range(1, 5), what="the job", kept="all is kept"
        ):
            pass


def test_the_symmetry_trains_at_its_own_outer_lr_through_the_schedule():
    maml = MAML(MSRLinear(3, 1, latent=2), F.mse_loss, inner_steps=1)
    cfg = RunConfig(steps=10, eval_every=5, outer_lr=1e-2, symmetry_lr_scale=10.0)
    groups = outer_groups(maml, cfg)
    assert [g["params"] for g in groups][1] == [maml.model.U]
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in maml.parameters()}
    optimizer = torch.optim.Adam(groups, lr=cfg.outer_lr)
    _, _, meta_batch = _setup()
    for _ in outer_steps(
        maml, optimizer, meta_batch, range(1, 3), what="t", kept="k", learning_rate=lambda s: 0.5
    ):
        pass
    assert [g["lr"] for g in optimizer.param_groups] == [0.5, 5.0]  # the schedule keeps the ratio
    assert len(outer_groups(maml, replace(cfg, symmetry_lr_scale=1.0))) == 1  # as without U


def test_settings_override_any_field_typed_and_checked():
    cfg = FEW_SHOT["omniglot"]["cpu"]
    changed = with_settings(
        cfg, ["hidden=64", "symmetry_lr_scale=1e1", "test_inner_steps=1,5", "first_order=true"]
    )
    assert (changed.hidden, changed.symmetry_lr_scale) == (64, 10.0)
    assert changed.test_inner_steps == (1, 5) and changed.first_order is True
    for settings, message in [
        (["width=3"], "FIELD one of steps, eval_every"),
        (["hidden"], "expected FIELD=VALUE"),
        (["hidden=2.5"], "hidden=2.5: expected int like 32"),
        (["first_order=yes"], "expected bool"),
        (["hidden=3", "hidden=4"], "given twice"),
        (["outer_lr=-1"], "outer_lr must be positive and finite, got -1.0"),
        (["inner_lr=nan"], "inner_lr must be positive and finite"),
        (["symmetry_init_noise=-0.1"], "symmetry_init_noise must be >= 0"),
        (["augment=flips"], "augment must be one of"),
    ]:
        with pytest.raises(ValueError, match=message):
            with_settings(cfg, settings)


def test_a_preset_field_refuses_a_bool_or_a_fraction_for_a_number():
    with pytest.raises(ValueError, match="inner_lr must be float, got True"):
        replace(SYNTHETIC["tiny"], inner_lr=True)
    with pytest.raises(ValueError, match=r"steps must be int, got 2\.5"):
        replace(SYNTHETIC["tiny"], steps=2.5)


def test_the_complete_experiment_of_the_architecture_guide_runs_as_shown(tmp_path):
    """docs/architecture.md's minimal experiment, as printed there (at most 80 lines): a
    command with the runner's flags, a folder per job (its model file, metrics, result and
    figure), results.json."""
    guide = (REPO_ROOT / "docs" / "architecture.md").read_text()
    code = guide.split("### A complete experiment", 1)[1].split("```python\n", 1)[1]
    code = code.split("```", 1)[0]
    assert len(code.splitlines()) <= 80
    script = tmp_path / "circulant.py"
    script.write_text(code)
    out = tmp_path / "run"
    command = [sys.executable, str(script), "--out", str(out), "--steps", "20"]
    command += ["--set", "eval_every=10", "test_tasks=8", "--seeds", "0", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert "MSR-FC (seed 1): " in done.stdout and "MAML-FC (seed 0): " in done.stdout
    results = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in results["runs"]] == [
        ("MSR-FC", 0),
        ("MAML-FC", 0),
        ("MSR-FC", 1),
        ("MAML-FC", 1),
    ]
    assert all(0 < r["mse"] < float("inf") for r in results["runs"])
    assert 0 <= results["runs"][0]["symmetry"]["recall"] <= 1
    jobs = ("MSR-FC_s0", "MAML-FC_s0", "MSR-FC_s1", "MAML-FC_s1")
    files = ("metrics.jsonl", "model.pt", "result.json")
    expected = {f"{job}/{name}" for job in jobs for name in files}
    assert {str(p.relative_to(out)) for p in out.glob("*/*")} == expected | {
        "MSR-FC_s0/U.png",
        "MSR-FC_s1/U.png",
    }
