"""The one meta-training loop: steps in order, a stop taken between steps after ``on_stop``
has kept the finished ones, and a diverged loss named with its step."""

import os
import signal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from experiments.cli import Stopped, deferred_stops
from experiments.engine import NonFiniteLossError, outer_steps
from msr import MAML, TaskBatch


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
