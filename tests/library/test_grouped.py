"""batching="grouped": the whole meta-batch as one grouped computation equals the per-task loop."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msr import MAML, MSRConv2d, MSRLinear, ProtoNet, TaskBatch, accuracy
from msr.grouped import check_groupable, grouped_call
from msr.models import conv4


def _episodes(tasks=3, ways=3, shots=2, queries=2, size=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(ways)

    def images(per_class):
        return torch.randn(tasks, ways * per_class, 1, size, size, generator=generator).double()

    return TaskBatch(
        images(shots),
        labels.repeat(shots).expand(tasks, -1).contiguous(),
        images(queries),
        labels.repeat(queries).expand(tasks, -1).contiguous(),
    )


def _pair(build):
    """The same learner twice (same weights): grouped and per-task loop."""
    torch.manual_seed(0)
    grouped = build("grouped")
    looped = build("loop")
    looped.load_state_dict(grouped.state_dict())
    return grouped, looped


def _step(learner, tasks):
    learner.zero_grad()
    losses = learner.meta_backward(tasks)
    return losses, {n: p.grad for n, p in learner.named_parameters() if p.grad is not None}


def _assert_same_training(grouped, looped, tasks, metrics=None):
    loss_g, grads_g = _step(grouped, tasks)
    loss_l, grads_l = _step(looped, tasks)
    torch.testing.assert_close(loss_g, loss_l, rtol=0, atol=1e-10)
    assert grads_g.keys() == grads_l.keys()
    for name in grads_l:
        torch.testing.assert_close(grads_g[name], grads_l[name], rtol=1e-8, atol=1e-10, msg=name)
    metrics = {"accuracy": accuracy} if metrics is None else metrics
    scored_g = grouped.evaluate(tasks, metrics, chunk_size=2)
    scored_l = looped.evaluate(tasks, metrics)
    assert scored_g.keys() == scored_l.keys() == {"loss", *metrics}
    for key in scored_l:
        torch.testing.assert_close(scored_g[key], scored_l[key], rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "method, options",
    [
        ("msr", {}),
        ("maml", {}),
        ("maml", {"inner_steps": 2, "first_order": True}),
        ("anil", {}),
    ],
)
def test_conv4_meta_gradients_equal_the_loop(method, options):
    """Conv-4 (its ReLU-then-max-pool run in the other order, BatchNorm as one grouped batch
    norm), in fp64 on the CPU: the loop's losses, meta-gradients and scores."""

    def build(batching):
        model = conv4(1, 16, 4, 3, learn_symmetry=method == "msr").double()
        head = ["17.weight", "17.bias"] if method == "anil" else None
        return MAML(model, F.cross_entropy, batching=batching, fast_parameters=head, **options)

    _assert_same_training(*_pair(build), _episodes())


def test_test_time_inner_steps_run_grouped_too():
    grouped, looped = _pair(
        lambda b: MAML(conv4(1, 16, 4, 3).double(), F.cross_entropy, batching=b)
    )
    tasks = _episodes()
    torch.testing.assert_close(
        grouped.evaluate(tasks, inner_steps=3)["loss"],
        looped.evaluate(tasks, inner_steps=3)["loss"],
        rtol=0,
        atol=1e-10,
    )


def test_protonet_grouped_equals_the_loop():
    _assert_same_training(
        *_pair(lambda b: ProtoNet(conv4(1, 16, 4).double(), 3, batching=b)), _episodes()
    )


def test_rows_models_with_batchnorm_and_dense_U():
    """Linear models on (tasks, N, F) rows: MSRLinear (learned U, identity U), nn.Linear, a
    BatchNorm1d of task statistics."""

    def build(batching):
        model = nn.Sequential(
            MSRLinear(6, 5, 4),
            nn.BatchNorm1d(5, track_running_stats=False),
            nn.GELU(),
            MSRLinear.fully_connected(5, 4, bias=True),
            nn.Tanh(),
            nn.Linear(4, 2),
        ).double()
        return MAML(model, batching=batching, inner_steps=2)

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 9, 6, generator=generator, dtype=torch.float64)
    y = torch.randn(4, 9, 2, generator=generator, dtype=torch.float64)
    tasks = TaskBatch(x[:, :4], y[:, :4], x[:, 4:], y[:, 4:])
    _assert_same_training(*_pair(build), tasks, metrics={})


def test_dense_conv_U_and_plain_conv_layers():
    def build(batching):
        basis = torch.randn(4 * 1 * 9, 5)
        model = nn.Sequential(
            MSRConv2d.from_basis(basis, 1, 4, 3, learn_U=True, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 3, 3),
            nn.AvgPool2d(2),
            nn.Flatten(),
        ).double()
        return MAML(model, F.mse_loss, batching=batching)

    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 1, 8, 8, generator=generator, dtype=torch.float64)
    y = torch.randn(2, 5, 27, generator=generator, dtype=torch.float64)
    tasks = TaskBatch(x[:, :2], y[:, :2], x[:, 2:], y[:, 2:])
    _assert_same_training(*_pair(build), tasks, metrics={})


def test_grouped_call_gives_each_task_its_own_output():
    """Per task, the folded computation is the model with that task's weights."""
    model = conv4(1, 16, 4, 3).double()
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    per_task = {"0.v": torch.randn(2, *state["0.v"].shape, dtype=torch.float64)}
    x = torch.randn(2, 5, 1, 16, 16, dtype=torch.float64)
    out = grouped_call(model, {**state, **per_task}, per_task.keys(), x)
    for task in range(2):
        with torch.no_grad():
            model[0].v.copy_(per_task["0.v"][task])
        torch.testing.assert_close(out[task], model(x[task]), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "model, message",
    [
        (nn.Sequential(nn.Linear(3, 3), nn.LSTM(3, 3)), r"1 is a LSTM: use batching='loop'"),
        (nn.Sequential(nn.Conv2d(2, 2, 3, groups=2)), "0 with groups=1 and zero padding"),
        (nn.Sequential(nn.Flatten(0)), "0 to flatten dims 1..-1"),
    ],
)
def test_models_it_cannot_run_are_refused_by_name(model, message):
    with pytest.raises(ValueError, match=message):
        check_groupable(model)
    with pytest.raises(ValueError, match=message):
        MAML(model, batching="grouped")


@pytest.mark.parametrize("method", ["maml", "msr", "protonet"])
def test_the_few_shot_driver_defaults_to_grouped_with_the_loops_meta_gradient(method):
    """The few-shot presets run grouped; the driver's learners train as on the per-task loop."""
    from dataclasses import replace

    from experiments.few_shot import build_learner
    from experiments.presets import FEW_SHOT

    assert {cfg.batching for presets in FEW_SHOT.values() for cfg in presets.values()} == {
        "grouped"
    }
    cfg = replace(FEW_SHOT["omniglot"]["tiny"], image_size=16)
    grouped, looped = _pair(
        lambda b: build_learner(method, 1, 3, replace(cfg, batching=b)).double()
    )
    assert grouped.batching == "grouped" and looped.batching == "loop"
    _assert_same_training(grouped, looped, _episodes())
