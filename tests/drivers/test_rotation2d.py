"""The 2-D group-convolution tasks: equivariance of every generated task, the paper's statistics."""

import pytest
import torch
import torch.nn.functional as F

from synthetic.rotation2d import ExactGrid2D, Steerable2D


@pytest.mark.parametrize(
    "data, channels",
    [
        (ExactGrid2D(group_name="c4", seed=2, num_tasks=50), 12),
        (ExactGrid2D(group_name="d4", seed=2, num_tasks=50), 24),
        (Steerable2D(group_name="c8", seed=2, num_tasks=50), 24),
        (Steerable2D(group_name="d8", seed=2, num_tasks=50), 48),
    ],
)
def test_generated_tasks_are_equivariant(data, channels):
    tasks, coefficients = data.tasks(torch.tensor([0, 41]))
    assert tasks.x_support.shape == (2, 1, 1, 32, 32)
    assert tasks.y_query.shape == (2, 19, channels, 30, 30)
    kernels = data.weights(coefficients)
    for t in range(2):
        x = tasks.x_query[t]
        torch.testing.assert_close(tasks.y_query[t], F.conv2d(x, kernels[t]), rtol=0, atol=1e-5)
        for g in data.group.grid_elements:  # all of C4 / D4; the 90-degree subgroup of C8 / D8
            moved_input = F.conv2d(data.group.transform(x, g), kernels[t])
            moved_output = data.group.act_regular(tasks.y_query[t], g)
            assert (moved_input - moved_output).abs().max() < 1e-5
    assert 0.1 < tasks.y_query.var().item() < 2.0  # unit-scale targets


@pytest.mark.parametrize("group, variance", [("c8", 0.625), ("d8", 0.5625)])
def test_steerable_tasks_have_the_paper_statistics(group, variance):
    data = Steerable2D(group_name=group, seed=0, num_tasks=10_000, examples_per_task=2)
    tasks, coefficients = data.tasks(torch.arange(600))
    # e2cnn's init: W = B (std * N(0, I)); the sample std of each coefficient
    sample_std = coefficients.std(dim=0) / data.coefficient_std
    assert sample_std.sub(1).abs().max() < 0.15
    # per-output variance of y (the analytic value is tested against e2cnn in test_steerable)
    assert tasks.y_query.var().item() == pytest.approx(variance, rel=0.1)


def test_tasks_differ_and_repeat():
    data = ExactGrid2D(group_name="d4", num_tasks=20)
    (first, coefficients), (again, _) = data.tasks(torch.arange(3)), data.tasks(torch.tensor([2]))
    assert torch.equal(first.y_query[2], again.y_query[0])
    assert not torch.allclose(coefficients[0], coefficients[1])
    assert coefficients.shape == (3, 27)  # 3 free 3x3 filters
    assert Steerable2D(group_name="d8").tasks(torch.arange(2))[1].shape == (2, 18)


@pytest.mark.parametrize(
    "factory, kwargs, message",
    [
        (ExactGrid2D, {"group_name": "c8"}, "exact-grid data needs a group that maps the pixel"),
        (ExactGrid2D, {"group_name": "q4"}, "unknown group 'q4'"),
        (ExactGrid2D, {"filters": 0}, "filters must be a positive integer, got 0"),
        (ExactGrid2D, {"kernel_size": 5, "image_size": 4}, "kernel_size=5 > image_size=4"),
        (Steerable2D, {"kernel_size": 4}, "kernel_size must be odd, got 4"),
    ],
)
def test_bad_arguments(factory, kwargs, message):
    with pytest.raises(ValueError, match=message):
        factory(**kwargs)


def test_the_old_name_rotation2d_still_imports_with_a_deprecation_line():
    with pytest.warns(DeprecationWarning, match="Rotation2D is now ExactGrid2D"):
        from synthetic.rotation2d import Rotation2D
    assert Rotation2D is ExactGrid2D
