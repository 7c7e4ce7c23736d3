"""ProtoNets and the Conv-4 backbone."""

import pytest
import torch
from torch import nn

from msr import ProtoNet, TaskBatch, accuracy, partition_parameters
from msr.models import conv4


def _tasks(num_tasks=3, ways=4, shots=2, queries=3, dim=5):
    x = torch.randn(num_tasks, ways * (shots + queries), dim, dtype=torch.float64)
    labels = torch.arange(ways).repeat_interleave(shots + queries).expand(num_tasks, -1)
    support = torch.cat(
        [torch.arange(i * (shots + queries), i * (shots + queries) + shots) for i in range(ways)]
    )
    query = torch.tensor([i for i in range(x.shape[1]) if i not in support.tolist()])
    return TaskBatch(x[:, support], labels[:, support], x[:, query], labels[:, query])


def test_protonet_logits_are_negative_squared_distances_to_class_means():
    net = ProtoNet(nn.Identity(), ways=4)
    xs, ys, xq, _ = _tasks().task(0)
    logits = net.logits({}, xs, ys, xq)
    prototypes = torch.stack([xs[ys == c].mean(0) for c in range(4)])
    torch.testing.assert_close(logits, -torch.cdist(xq, prototypes).pow(2))


def test_protonet_vmap_and_loop_agree_and_learn():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    vmapped, looped = ProtoNet(encoder, 4), ProtoNet(encoder, 4, batching="loop")
    tasks = _tasks()
    vmapped.zero_grad()
    loss_v = vmapped.meta_backward(tasks)
    grads_v = [p.grad.clone() for p in encoder.parameters()]
    looped.zero_grad()
    loss_l = looped.meta_backward(tasks)
    torch.testing.assert_close(loss_v, loss_l)
    for g, p in zip(grads_v, encoder.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)
    scores = vmapped.evaluate(tasks, {"accuracy": accuracy})
    assert scores["accuracy"].shape == (3,) and 0 <= scores["accuracy"].min() <= 1
    with pytest.raises(ValueError, match="ways must be a positive integer, got 0"):
        ProtoNet(encoder, 0)


def test_conv4_shapes_roles_and_errors():
    net = conv4(1, 28, hidden=8, ways=5, learn_symmetry=True)
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 5)
    meta, fast = partition_parameters(net)
    assert len(meta) == 12 and all(".U_" in n for n in meta)
    assert fast[-2:] == ["17.weight", "17.bias"]  # the head
    plain = conv4(3, 84, hidden=4)
    assert partition_parameters(plain)[0] == []
    assert plain(torch.randn(2, 3, 84, 84)).shape == (2, 4 * 5 * 5)
    with pytest.raises(ValueError, match="image_size=8 is too small"):
        conv4(1, 8)
