"""The level field's inner-lr sweep: short runs per candidate, scored on training tasks only."""

from dataclasses import replace

import pytest
import torch

from experiments.engine import NonFiniteLossError
from experiments.synthetic import build_model
from experiments.training import TrainConfig, build_maml, sweep_inner_lr
from synthetic.translation1d import Translation1D

CFG = TrainConfig(steps=1, eval_every=1, meta_batch=4)


def _build(data):
    return lambda lr: build_maml(build_model("MAML-Conv", 1, data), replace(CFG, inner_lr=lr))


def test_sweep_picks_the_best_finite_candidate_and_scores_training_tasks(monkeypatch):
    data = Translation1D(1, seed=0, num_tasks=200)
    scored = []
    original = Translation1D.tasks

    def spy(self, indices, support=1):
        scored.append(torch.as_tensor(indices))
        return original(self, indices, support)

    monkeypatch.setattr(Translation1D, "tasks", spy)
    steps = []
    # 1e20 makes the first adapted weights overflow: that candidate diverges and scores None
    best, scores = sweep_inner_lr(
        _build(data), data, CFG, (0.01, 0.3, 1e20), 3, 10, 0, steps.append, method="x"
    )
    assert set(scores) == {"0.01", "0.3", "1e+20"} and scores["1e+20"] is None
    assert best == min((0.01, 0.3), key=lambda lr: scores[str(lr)])
    assert sum(steps) == 3 * 3  # the progress bar also counts a diverged candidate's steps
    assert torch.equal(scored[0], torch.arange(10))  # the scored tasks, drawn first
    assert max(int(i.max()) for i in scored) < data.num_train_tasks  # never a test task
    # the same sweep again gives the same scores: every candidate starts from the same seed
    assert sweep_inner_lr(_build(data), data, CFG, (0.01, 0.3), 3, 10, 0, steps.append)[1] == {
        k: v for k, v in scores.items() if v is not None
    }


def test_sweep_errors():
    data = Translation1D(1, seed=0, num_tasks=200)
    with pytest.raises(NonFiniteLossError, match="every inner-lr candidate diverged"):
        sweep_inner_lr(_build(data), data, CFG, (1e20,), 2, 5, 0, lambda n: None)
    with pytest.raises(ValueError, match="at least one candidate"):
        sweep_inner_lr(_build(data), data, CFG, (), 2, 5, 0, lambda n: None)
    with pytest.raises(ValueError, match=r"score_tasks must be in \[1, 160\], got 161"):
        sweep_inner_lr(_build(data), data, CFG, (0.1,), 2, 161, 0, lambda n: None)
