"""Devices: the library makes every tensor where its model or data lives; drivers take --device.

CI has no GPU, so placement is checked with the "meta" device: inside ``with
torch.device("meta")`` a tensor made without naming its device lands on "meta", and any op that
mixes it with the CPU model or data raises. A computation that runs there therefore created every
tensor on the device of its inputs, as it must on a GPU. ``test_cuda.py`` repeats the end-to-end
checks on a real GPU.
"""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT

from msr import MAML, ProtoNet, TaskBatch, accuracy, bases
from msr.data import ImageClasses, augment_images, sample_episodes
from msr.devices import resolve_device
from msr.equivariance import translation_equivariance_error
from msr.groups import get_group
from msr.models import conv4
from msr.streams import keyed_generator
from synthetic.rotation2d import ExactGrid2D, Steerable2D
from synthetic.translation1d import Translation1D

no_default_device = torch.device("meta")  # any tensor made without a device lands here


def _classes(count=6, per_class=4, size=28):
    return ImageClasses(torch.rand(count, per_class, 1, size, size), tuple(map(str, range(count))))


@pytest.mark.parametrize("learner_kind", ["maml-vmap", "maml-loop", "protonet"])
def test_a_meta_step_creates_its_tensors_beside_the_model_and_data(learner_kind):
    ways = 3
    if learner_kind == "protonet":
        learner = ProtoNet(conv4(1, 28, hidden=4), ways)
    else:
        model = conv4(1, 28, hidden=4, ways=ways, learn_symmetry=True)
        learner = MAML(model, F.cross_entropy, batching=learner_kind.removeprefix("maml-"))
    classes = _classes()
    with no_default_device:
        tasks = sample_episodes(
            classes, 2, ways, 1, 2, torch.Generator(device="cpu"), augment_images
        )
        losses = learner.meta_backward(tasks)
        scores = learner.evaluate(tasks, {"accuracy": accuracy})
        if learner_kind != "protonet":
            learner.adapted_model(tasks.x_support[0], tasks.y_support[0])
    assert losses.device.type == "cpu" and scores["accuracy"].device.type == "cpu"
    assert all(p.grad.device.type == "cpu" for p in learner.parameters() if p.grad is not None)


@pytest.mark.parametrize(
    "make_pool",
    [
        lambda: Steerable2D(group_name="d8", num_tasks=10, device="cpu"),
        lambda: ExactGrid2D(group_name="d4", num_tasks=10, device="cpu"),
        lambda: Translation1D(2, num_tasks=10, device="cpu"),
    ],
)
def test_synthetic_tasks_are_drawn_on_the_pool_device(make_pool):
    with no_default_device:
        pool = make_pool()
        tasks = pool.sample_train(3, torch.Generator(device="cpu"))
        test, coefficients = pool.tasks(pool.test_indices(2))
        pool.weights(coefficients)
    assert {t.device.type for t in (*tasks, *test, coefficients)} == {"cpu"}


def test_symmetry_scores_and_group_actions_follow_their_inputs():
    data = Steerable2D(group_name="c8", num_tasks=10)
    layer = conv4(1, 28, hidden=4)[0]  # any MSRConv2d: the scores only need a U
    U = torch.randn(data.basis.shape[0], 18, dtype=torch.float64).float()
    x = torch.randn(2, 8, 5, 5)
    with no_default_device:
        scores = data.recovery_scores(U)
        translation_equivariance_error(torch.randn(6, 8, device="cpu"))
        c4 = get_group("c4")
        c4.act_regular(c4.transform(x, 1), 1)
        layer.sharing_matrix()
    assert scores["nearest_group"] in scores["group_distances_deg"]


def test_bases_are_built_exactly_and_returned_on_the_requested_device():
    on_meta = [
        bases.identity(4, device="meta"),
        bases.conv1d(8, 3, device="meta"),
        bases.locally_connected1d(8, 3, device="meta"),
        bases.group_conv2d("d4", 1, 2, 3, device="meta"),
        *vars(bases.steerable_lifting2d("c8", 2, 3, device="meta")).values(),
    ]
    assert {t.device.type for t in on_meta} == {"meta"}
    with no_default_device:  # built on the CPU whatever the default device
        steerable = bases.steerable_lifting2d("d8", 1, 5)
    assert steerable.basis.device.type == "cpu"
    torch.testing.assert_close(steerable.basis, bases.steerable_lifting2d("d8", 1, 5).basis)


def test_a_generator_on_another_device_than_the_data_is_refused():
    on_meta = ImageClasses(torch.empty(6, 4, 1, 28, 28, device="meta"), tuple("abcdef"))
    with pytest.raises(ValueError, match="the generator is on cpu but the data on meta"):
        sample_episodes(on_meta, 2, 3, 1, 2, torch.Generator())
    with pytest.raises(ValueError, match="the generator is on cpu but the data on meta"):
        augment_images(on_meta.images[0], torch.Generator())


def test_image_classes_move_once():
    classes = _classes()
    moved = classes.to("meta")
    assert moved.images.device.type == "meta" and moved.names == classes.names


def test_keyed_streams_repeat_and_differ():
    def draw(seed, index):
        return torch.rand(4, generator=keyed_generator(seed, index))

    assert torch.equal(draw(0, 5), draw(0, 5))
    assert not torch.equal(draw(0, 5), draw(0, 6)) and not torch.equal(draw(0, 5), draw(1, 5))


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "cuda:x", ""):
        with pytest.raises(ValueError, match="unknown device"):
            resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a CPU-only machine")
@pytest.mark.parametrize(
    "driver, arguments",
    [
        ("experiments.synthetic", ["--preset", "tiny"]),
        ("experiments.rotation", ["--preset", "tiny"]),
        ("experiments.few_shot", ["--preset", "tiny", "--method", "maml"]),
    ],
)
def test_drivers_refuse_cuda_where_there_is_none(tmp_path, driver, arguments):
    command = [sys.executable, "-m", driver, *arguments, "--device", "cuda", "--out", tmp_path]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "device 'cuda': CUDA is not available here" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "results.json").exists()


def test_task_batch_to_moves_every_tensor_and_casts_only_floating_ones():
    labelled = TaskBatch(
        torch.rand(2, 3, 4),
        torch.arange(6).view(2, 3),
        torch.rand(2, 5, 4),
        torch.arange(10).view(2, 5),
    )
    moved = labelled.to(no_default_device, torch.float64)
    assert [t.device for t in moved] == [no_default_device] * 4
    assert [t.dtype for t in moved] == [torch.float64, torch.int64, torch.float64, torch.int64]
    regression = TaskBatch(*(torch.rand(1, 2) for _ in range(4)))
    assert {t.dtype for t in regression.to(dtype=torch.float64)} == {torch.float64}
    assert labelled.to("cpu").x_support is labelled.x_support  # nothing to change, no copy
