"""The library refuses what would give silently wrong results, and costs what it should: no
graph held across tasks in evaluation, episode draws independent of the largest class, frozen
parameters left frozen, and no NaN, shared learning rate or broadcast loss in place of an error."""

import errno
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from msr import MAML, MSRLinear, ProtoNet, TaskBatch
from msr.data import ImageClasses, sample_episodes


def _rss_bytes() -> int:
    """This process's resident memory now (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_evaluation_memory_stays_flat_in_the_number_of_tasks(batching):
    """Each task's graph is freed before the next task starts. Kept (as before), the graphs
    of this model added ~34 MB a task, 650 MB over the 19 tasks measured; freed, the resident
    memory drifts by some 40 MB (allocator noise)."""
    model = nn.Sequential(nn.Linear(1000, 1000), nn.Tanh(), nn.Linear(1000, 1))
    maml = MAML(model, inner_steps=2, batching=batching)
    tasks = TaskBatch(
        torch.randn(24, 1000, 1000), torch.randn(24, 1000, 1),
        torch.randn(24, 10, 1000), torch.randn(24, 10, 1),
    )  # fmt: skip
    resident = []

    def memory(prediction, target):  # called once per task, after its adaptation
        resident.append(_rss_bytes())
        return prediction.sum() * 0

    maml.evaluate(tasks, {"memory": memory}, chunk_size=1)
    growth = resident[-1] - resident[4]  # 19 more tasks after the allocator has warmed up
    assert growth < 150e6, f"{growth / 1e6:.0f} MB more after 19 more tasks"


class _LargestTensor(TorchFunctionMode):
    """Records the most elements of any tensor a torch function returns."""

    def __init__(self):
        super().__init__()
        self.most = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for value in result if isinstance(result, tuple | list) else (result,):
            if isinstance(value, torch.Tensor):
                self.most = max(self.most, value.numel())
        return result


def _classes(sizes):
    labels = torch.cat([torch.full((size,), c) for c, size in enumerate(sizes)])
    images = torch.arange(labels.numel(), dtype=torch.float32).view(-1, 1, 1, 1)
    return ImageClasses.from_labelled(images, labels)


def test_an_episode_draw_costs_what_the_episodes_hold_not_the_largest_class():
    classes = _classes([800_000, 30, 25, 40, 22, 31])
    generator = torch.Generator().manual_seed(0)
    with _LargestTensor() as largest:
        tasks = sample_episodes(classes, 16, 5, 1, 5, generator)
    # the biggest thing made: a (tasks, ways, shots + queries) index or the per-task class draw
    assert largest.most <= 16 * 5 * 6 and largest.most < 1000, largest.most
    for t in range(16):
        ids = torch.cat([tasks.x_support[t].flatten(), tasks.x_query[t].flatten()]).long()
        assert ids.unique().numel() == 30  # distinct images
        for label in range(5):  # each label's images come from one class
            mine = torch.cat(
                [tasks.x_support[t][tasks.y_support[t] == label].flatten(),
                 tasks.x_query[t][tasks.y_query[t] == label].flatten()]
            ).long()  # fmt: skip
            owners = torch.bucketize(mine, classes.starts, right=True) - 1
            assert owners.unique().numel() == 1


def test_the_direct_draw_is_uniform_over_images_and_orders():
    """Classes of 60 images, episodes of 3 per class: picked directly (60 > 4 x 3)."""
    classes = _classes([60, 60])
    generator = torch.Generator().manual_seed(1)
    tasks = sample_episodes(classes, 4000, 2, 1, 2, generator)
    support = tasks.x_support.view(4000, 2, 1).long()
    ids = torch.cat([support, tasks.x_query.view(4000, 2, 2).long()], -1) % 60  # (T, class, 3)
    first = torch.bincount(tasks.x_support.flatten().long() % 60, minlength=60).double()
    every = torch.bincount(ids.flatten(), minlength=60).double()
    for counts in (first, every):  # chi-square with 59 degrees of freedom: 99.9% below 99.6
        expected = counts.sum() / 60
        assert ((counts - expected) ** 2 / expected).sum() < 99.6
    per_class = ids.sort(-1).values  # distinct within each class of each task
    assert (per_class[..., 1:] != per_class[..., :-1]).all()


def test_a_small_class_draw_is_unchanged():
    """Omniglot-sized classes keep the ranking draw, so earlier seeds give the same episodes."""
    generator = torch.Generator().manual_seed(3)
    classes = _classes([20] * 8)
    tasks = sample_episodes(classes, 2, 5, 1, 5, generator)
    generator = torch.Generator().manual_seed(3)
    chosen = torch.stack([torch.randperm(8, generator=generator)[:5] for _ in range(2)])
    keys = torch.rand(2, 5, 20, generator=generator).argsort(-1)[..., :6]
    expected = (classes.starts[chosen].unsqueeze(-1) + keys).float()
    assert torch.equal(tasks.x_support.view(2, 5), expected[..., 0])
    assert torch.equal(tasks.x_query.view(2, 5, 5), expected[..., 1:])


def _regression_tasks(num_tasks=3):
    x = torch.randn(num_tasks, 8, 4)
    y = x @ torch.randn(num_tasks, 4, 2)
    return TaskBatch(x[:, :4], y[:, :4], x[:, 4:], y[:, 4:])


@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_a_frozen_fast_parameter_stays_frozen_unadapted_and_unchanged(batching):
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    maml = MAML(model, batching=batching)
    model[0].weight.requires_grad_(False)  # frozen after the learner was built
    frozen = model[0].weight.clone()
    optimizer = torch.optim.SGD(maml.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        maml.meta_backward(_regression_tasks())
        optimizer.step()
    assert not model[0].weight.requires_grad and model[0].weight.grad is None
    assert torch.equal(model[0].weight, frozen)
    adapted = maml.adapted_model(*_regression_tasks().task(0)[:2])
    assert torch.equal(adapted[0].weight, frozen)  # not adapted either
    assert not torch.equal(adapted[2].weight, model[2].weight)
    assert maml.raw_inner_lrs["0__weight"].grad is None
    model.requires_grad_(False)
    with pytest.raises(ValueError, match=r"every fast parameter .* is frozen"):
        maml.meta_backward(_regression_tasks())


def test_protonet_refuses_a_support_set_missing_a_class():
    learner = ProtoNet(nn.Flatten(), ways=3)
    x = torch.randn(2, 3, 4)
    good = torch.tensor([[0, 1, 2], [2, 1, 0]])
    learner.evaluate(TaskBatch(x, good, x, good))
    missing = torch.tensor([[0, 1, 2], [0, 1, 1]])
    for run in (learner.evaluate, learner.meta_backward, learner.meta_loss):
        with pytest.raises(ValueError, match="task 1's support set has no example of class 2"):
            run(TaskBatch(x, missing, x, good))
    with pytest.raises(ValueError, match=r"support labels must be 0\.\.2"):
        learner.evaluate(TaskBatch(x, good + 1, x, good))


def test_parameter_names_that_would_share_an_inner_lr_are_refused():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 2)
            self.a__weight = nn.Parameter(torch.zeros(2))

        def forward(self, x):
            return self.a(x) + self.a__weight

    with pytest.raises(ValueError, match=r"'a__weight' and 'a\.weight' would share"):
        MAML(Two())


@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_targets_that_would_broadcast_against_the_predictions_are_refused(batching):
    maml = MAML(nn.Sequential(MSRLinear(4, 1, 3)), batching=batching)
    x = torch.randn(2, 5, 4)
    y = torch.randn(2, 5, 1)
    maml.evaluate(TaskBatch(x, y, x, y))
    with pytest.raises(ValueError, match=r"support targets of shape \(5,\) for predictions of"):
        maml.evaluate(TaskBatch(x, y[..., 0], x, y[..., 0]))
    with pytest.raises(ValueError, match=r"support and query examples differ in shape: .*targets"):
        maml.meta_backward(TaskBatch(x, y, x, y[..., 0]))
    classifier = MAML(nn.Sequential(nn.Linear(4, 3)), F.cross_entropy, batching=batching)
    labels = torch.randint(0, 3, (2, 5))  # class labels: (N,) against (N, classes) logits
    classifier.evaluate(TaskBatch(x, labels, x, labels))


@pytest.mark.parametrize("inner_lr", [math.inf, -math.inf, math.nan, 0.0, -0.1, "0.1"])
def test_inner_lrs_that_are_not_positive_and_finite_are_refused(inner_lr):
    with pytest.raises(ValueError, match="inner_lr must be a positive finite number"):
        MAML(nn.Linear(2, 2), inner_lr=inner_lr)


def test_a_figure_that_fails_to_save_keeps_the_previous_file(tmp_path, monkeypatch):
    """``msr.viz.save`` writes beside the target and renames: a full disk halfway through the
    image leaves the earlier file whole and no temporary file (before, a truncated PNG)."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from msr import viz

    path = tmp_path / "U.png"
    first = viz.save(viz.plot_matrices([("U", torch.eye(3))], "one"), path)
    previous = first.read_bytes()
    assert previous.startswith(b"\x89PNG")
    real_savefig = Figure.savefig

    def disk_full(self, stream, **options):
        real_savefig(self, stream, **options)
        stream.truncate(len(previous) // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Figure, "savefig", disk_full)
    with pytest.raises(OSError, match="No space left"):
        viz.save(viz.plot_matrices([("U", 2 * torch.eye(3))], "two"), path)
    assert path.read_bytes() == previous
    assert [p.name for p in tmp_path.iterdir()] == ["U.png"]
