"""The 2-D group-convolution tasks: exact C4 / D4 equivariance of every generated task."""

import pytest
import torch
import torch.nn.functional as F

from synthetic.rotation2d import Rotation2D


@pytest.mark.parametrize("group, channels", [("c4", 12), ("d4", 24)])
def test_generated_tasks_are_equivariant(group, channels):
    data = Rotation2D(group_name=group, seed=2, num_tasks=50)
    tasks, coefficients = data.tasks(torch.tensor([0, 41]))
    assert tasks.x_support.shape == (2, 1, 1, 32, 32)
    assert tasks.y_query.shape == (2, 19, channels, 30, 30)
    kernels = data.weights(coefficients)
    for t in range(2):
        x = tasks.x_query[t]
        torch.testing.assert_close(tasks.y_query[t], F.conv2d(x, kernels[t]), rtol=0, atol=1e-5)
        for g in range(data.group.order):
            moved_input = F.conv2d(data.group.transform(x, g), kernels[t])
            moved_output = data.group.act_regular(tasks.y_query[t], g)
            assert (moved_input - moved_output).abs().max() < 1e-5
    assert 0.5 < tasks.y_query.var().item() < 2.0  # unit-scale targets


def test_tasks_differ_and_repeat():
    data = Rotation2D(group_name="d4", num_tasks=20)
    (first, coefficients), (again, _) = data.tasks(torch.arange(3)), data.tasks(torch.tensor([2]))
    assert torch.equal(first.y_query[2], again.y_query[0])
    assert not torch.allclose(coefficients[0], coefficients[1])
    assert coefficients.shape == (3, 27)  # 3 free 3x3 filters


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"group_name": "c8"}, "unknown group 'c8'"),
        ({"filters": 0}, "filters must be a positive integer, got 0"),
        ({"kernel_size": 5, "image_size": 4}, "kernel_size=5 > image_size=4"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Rotation2D(**kwargs)
