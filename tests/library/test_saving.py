"""Model files that describe themselves: msr.save / msr.load round trips, refusals, and the
drivers' model files opened without the drivers."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import msr
from msr import MAML, ModelFileError, MSRConv2d, MSRLinear, ProtoNet, TaskBatch, bases
from msr.models import conv4
from msr.saving import architecture


def _tasks(num_tasks=3, dim=6, out=4):
    x = torch.randn(num_tasks, 8, dim)
    y = torch.randn(num_tasks, 8, out)
    return TaskBatch(x[:, :3], y[:, :3], x[:, 3:], y[:, 3:])


def _images(ways=3, size=28):
    x = torch.randn(2, ways * 2, 1, size, size)
    y = torch.arange(ways).repeat(2).expand(2, ways * 2)
    return TaskBatch(x, y, x, y)


def _learners():
    """One of each kind a model file holds: trained a step, so nothing is at its init."""
    mlp = nn.Sequential(
        MSRLinear(6, 5, 7),
        nn.Tanh(),
        nn.Dropout(0.0),
        MSRLinear.from_basis(bases.conv1d(5, 3), 5, 3),
        nn.GELU(),
        nn.Linear(3, 4),
    )
    c4 = bases.group_conv2d("c4", 1, 2, 3)
    conv = nn.Sequential(
        MSRConv2d.from_basis(c4, 1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 4, 3, stride=2),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 3),
    )
    return {
        "maml-mlp": (MAML(mlp, inner_steps=2, per_step_inner_lr=True), _tasks()),
        "maml-conv": (MAML(conv, F.cross_entropy, batching="loop"), _images()),
        "msr-conv4": (
            MAML(conv4(1, 28, hidden=4, ways=3, learn_symmetry=True), F.cross_entropy),
            _images(),
        ),
        "anil": (
            MAML(
                conv4(1, 28, hidden=4, ways=3),
                F.cross_entropy,
                inner_loss_fn=F.nll_loss,
                fast_parameters=["17.weight", "17.bias"],
                first_order=True,
                learn_inner_lr=False,
            ),
            _images(),
        ),
        "protonet": (ProtoNet(conv4(1, 28, hidden=4), 3, batching="loop"), _images()),
    }


@pytest.mark.parametrize("kind", list(_learners()))
def test_a_saved_learner_loads_as_it_was(kind, tmp_path):
    torch.manual_seed(0)
    learner, tasks = _learners()[kind]
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-2)
    learner.meta_backward(tasks)
    optimizer.step()
    path = msr.save(learner, tmp_path / "model.pt", {"seed": 0, "note": kind})
    torch.manual_seed(1)  # a different fresh initialization underneath
    loaded = msr.load(path)
    assert type(loaded) is type(learner) and loaded.batching == learner.batching
    assert architecture(loaded) == architecture(learner)
    for (name, ours), (_, theirs) in zip(
        learner.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(ours, theirs), name
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == [
        n for n, p in learner.named_parameters() if p.requires_grad
    ]
    torch.testing.assert_close(loaded.evaluate(tasks)["loss"], learner.evaluate(tasks)["loss"])
    assert msr.saving.read(path)["metadata"] == {"seed": 0, "note": kind}


def test_a_plain_network_and_a_frozen_parameter_round_trip(tmp_path):
    network = nn.Sequential(MSRLinear.fully_connected(4, 3), nn.ReLU(), nn.Linear(3, 2))
    network[2].weight.requires_grad_(False)
    loaded = msr.load(msr.save(network, tmp_path / "net.pt"))
    assert type(loaded) is nn.Sequential and loaded[0].U is None  # the identity, not built
    assert not loaded[2].weight.requires_grad and loaded[2].bias.requires_grad
    x = torch.randn(5, 4)
    assert torch.equal(loaded(x), network(x))


def test_what_cannot_be_described_is_refused_by_name(tmp_path):
    class Custom(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(ModelFileError, match="a Custom cannot be described as data"):
        msr.save(nn.Sequential(nn.Linear(2, 2), Custom()), tmp_path / "a.pt")
    with pytest.raises(ModelFileError, match=r"loss_fn <function .*<lambda> .* not one of torch"):
        msr.save(MAML(nn.Linear(2, 2), lambda p, t: (p - t).abs().mean()), tmp_path / "b.pt")
    rule = MAML(nn.Linear(2, 2), inner_update=lambda params, grads, step: params)
    with pytest.raises(ModelFileError, match="inner_update of your own"):
        msr.save(rule, tmp_path / "c.pt")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_a_changed_foreign_or_unsafe_file_is_refused(tmp_path):
    path = msr.save(nn.Sequential(nn.Linear(2, 2)), tmp_path / "net.pt")
    saved = torch.load(path, weights_only=True)
    saved["state_dict"]["0.bias"] += 1.0  # an edit after saving
    torch.save(saved, tmp_path / "changed.pt")
    with pytest.raises(ModelFileError, match=r"changed\.pt is corrupt: its contents do not match"):
        msr.load(tmp_path / "changed.pt")
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "foreign.pt")
    with pytest.raises(ModelFileError, match=r"foreign\.pt holds no checksum"):
        msr.load(tmp_path / "foreign.pt")
    torch.save({"code": Unpicklable()}, tmp_path / "unsafe.pt")
    with pytest.raises(ModelFileError, match=r"unsafe\.pt cannot be loaded safely"):
        msr.load(tmp_path / "unsafe.pt")
    with pytest.raises(FileNotFoundError):
        msr.load(tmp_path / "missing.pt")


class Unpicklable:
    """A class a weights-only load refuses to rebuild."""


def test_a_drivers_model_file_loads_without_the_drivers(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "experiments.few_shot", "--method", "msr", "--preset"]
    command += ["tiny", "--steps", "2", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    model = out / "msr_omniglot_5w1s_s0" / "model.pt"
    check = (
        "import sys, msr; learner = msr.load(sys.argv[1]); "
        "assert 'experiments' not in sys.modules; "
        "print(type(learner).__name__, learner.inner_steps, len(learner.fast_names))"
    )
    done = subprocess.run(
        [sys.executable, "-c", check, str(model)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["MAML", "1", "18"]
    assert (
        msr.saving.read(model)["metadata"]["tags"]["method"] == "msr"
    )  # the driver's fields beside it


def test_a_learners_test_time_inner_steps_travel_with_its_model_file(tmp_path):
    maml = MAML(nn.Sequential(MSRLinear(4, 3, latent=2)), F.mse_loss, test_inner_steps=5)
    loaded = msr.load(msr.save(maml, tmp_path / "model.pt"))
    assert loaded.test_inner_steps == 5 and loaded.inner_steps == 1
    x = torch.randn(2, 3, 4)
    tasks = TaskBatch(x[:, :1], x[:, :1, :3], x[:, 1:], x[:, 1:, :3])
    assert torch.equal(
        loaded.evaluate(tasks)["loss"], loaded.evaluate(tasks, inner_steps=5)["loss"]
    )
    assert not torch.equal(
        loaded.evaluate(tasks)["loss"], maml.evaluate(tasks, inner_steps=1)["loss"]
    )
