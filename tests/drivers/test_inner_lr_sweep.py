"""The swept protocol's inner-lr sweep: short runs per candidate, scored on training tasks only."""

from dataclasses import replace

import pytest
import torch

from experiments import rotation, synthetic
from experiments.presets import RotationConfig
from experiments.rotation import sweep_inner_lr
from msr import NonFiniteLossError
from synthetic.translation1d import Translation1D

CFG = RotationConfig(steps=1, eval_every=1, meta_batch=4, test_tasks=10, sweep_steps=3)
TAGS = {"method": "MAML-Conv", "k": 1, "seed": 0}


def _build(lr):
    cfg = replace(CFG, inner_lr=lr)
    return synthetic.EXPERIMENT.plan(TAGS, cfg, None, torch.device("cpu"))


def test_sweep_picks_the_best_finite_candidate_and_scores_the_tasks_it_is_given():
    data = Translation1D(1, seed=0)
    scored = data.tasks(torch.arange(10))[0]  # training tasks
    steps = []
    # 1e20 makes the first adapted weights overflow: that candidate diverges and scores None
    cfg = replace(CFG, lr_candidates=(0.01, 0.3, 1e20))
    best, scores = sweep_inner_lr(_build, cfg, scored, 0, steps.append)
    assert set(scores) == {"0.01", "0.3", "1e+20"} and scores["1e+20"] is None
    assert best == min((0.01, 0.3), key=lambda lr: scores[str(lr)])
    assert sum(steps) == 3 * 3  # the progress bar also counts a diverged candidate's steps
    # the same sweep again gives the same scores: every candidate starts from the same seed
    again = sweep_inner_lr(_build, replace(CFG, lr_candidates=(0.01, 0.3)), scored, 0)[1]
    assert again == {k: v for k, v in scores.items() if v is not None}


def test_sweep_errors():
    scored = Translation1D(1, seed=0).tasks(torch.arange(5))[0]
    with pytest.raises(NonFiniteLossError, match="every inner-lr candidate diverged"):
        sweep_inner_lr(_build, replace(CFG, lr_candidates=(1e20,)), scored, 0)
    with pytest.raises(ValueError, match="at least one candidate"):
        sweep_inner_lr(_build, replace(CFG, lr_candidates=()), scored, 0)


def test_the_rotation_sweep_scores_training_tasks_only(monkeypatch):
    cfg = replace(rotation.EXPERIMENT.presets["tiny"], sweep_tasks=10**6)
    tags = {"method": "MAML-Conv", "group": "c4", "protocol": "swept", "seed": 0}
    with pytest.raises(ValueError, match=r"sweep_tasks must be in \[1, 8000\] \(training tasks\)"):
        rotation.EXPERIMENT.tune(tags, cfg, torch.device("cpu"), lambda steps: None)
    tuned, notes = rotation.EXPERIMENT.tune(
        tags, rotation.EXPERIMENT.presets["tiny"], torch.device("cpu"), lambda steps: None
    )
    assert tuned.inner_lr == notes["inner_lr_init"] in (0.1, 10.0)
    assert set(notes["inner_lr_sweep"]) == {"0.1", "10.0"}
