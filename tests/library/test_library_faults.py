"""The library refuses what would give silently wrong results, and costs what it should: no
graph held across tasks in evaluation, episode draws independent of the largest class, frozen
parameters left frozen, and no NaN, shared learning rate or broadcast loss in place of an error;
a malformed or crafted model file, a bool for a number, data that is mis-scaled, pickled or a
decompression bomb are each one clear error."""

import errno
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.overrides import TorchFunctionMode

import msr
from msr import MAML, ModelFileError, MSRLinear, NonFiniteLossError, ProtoNet, TaskBatch
from msr._files import with_checksum
from msr.data import ImageClasses, load_omniglot, sample_episodes
from msr.data.images import read_image


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


def _model_file(path, mutate):
    msr.save(MAML(torch.nn.Sequential(MSRLinear(4, 3, latent=2)), F.mse_loss), path)
    payload = {k: v for k, v in torch.load(path, weights_only=True).items() if k != "sha256"}
    mutate(payload)
    torch.save(with_checksum(payload), path)  # a valid checksum: only the fields are wrong
    return path


def _set(field, value):
    def mutate(payload):
        target = payload
        *parents, last = field.split(".")
        for key in parents:
            target = target[key]
        if value is KeyError:
            del target[last]
        else:
            target[last] = value

    return mutate


def _state(name, value):
    return lambda payload: payload["state_dict"].__setitem__(name, value)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_set("format", "msr-model/2"), "in format 'msr-model/2'; this msr reads msr-model/1"),
        (_set("architecture.learner.colour", "red"), r"options are off \(unknown \['colour'\]"),
        (_set("architecture.learner.inner_steps", KeyError), r"missing \['inner_steps'\]"),
        (_set("architecture.learner.loss_fn", "system"), "loss 'system' is not one of"),
        (_set("architecture.frozen", KeyError), "must hold a learner, a network and frozen"),
        (_set("architecture.frozen", ["0.nothing"]), "frozen must list parameters"),
        (_set("architecture.network.layers", [{"type": "Linear"}]), "a Linear with {}"),
        (_set("architecture.network.layers", [{"type": "Exec"}]), "unknown module type 'Exec'"),
        (_state("model.0.v", torch.zeros(5)), r"state dict does not fit .*\(5,\)"),
        (_state("extra", torch.zeros(1)), "state dict does not fit .*extra"),
    ],
)
def test_every_malformed_field_of_a_model_file_is_a_model_file_error(tmp_path, mutate, message):
    path = _model_file(tmp_path / "model.pt", mutate)
    with pytest.raises(ModelFileError, match=message):
        msr.load(path)


def test_a_small_file_describing_a_huge_model_is_refused_before_allocating(tmp_path):
    def huge(payload):
        payload["architecture"]["network"]["layers"][0].update(in_features=200_000)
        payload["architecture"]["network"]["layers"][0].update(out_features=200_000)

    path = _model_file(tmp_path / "model.pt", huge)
    assert path.stat().st_size < 10_000
    with pytest.raises(ModelFileError, match="describes 80,000,200,005 values, more than"):
        msr.load(path)  # an MSRLinear of latent 2 with a 40e9 x 2 U: 320 GB if allocated


def test_files_that_are_not_torch_files_say_so(tmp_path):
    png = tmp_path / "picture.pt"
    Image.new("L", (4, 4)).save(png, format="PNG")
    with pytest.raises(ModelFileError, match=r"is not a torch file \(it begins with b'\\x89PNG'"):
        msr.load(png)


def _linear_tasks(nan=False):
    x = torch.randn(3, 4, 5)
    if nan:
        x[1, 0, 0] = float("nan")
    return TaskBatch(x[:, :2], x[:, :2, :2], x[:, 2:], x[:, 2:, :2])


@pytest.mark.parametrize("batching", ["vmap", "loop", "grouped"])
def test_evaluate_refuses_non_finite_inputs_as_meta_backward_does(batching):
    maml = MAML(torch.nn.Sequential(torch.nn.Linear(5, 2)), F.mse_loss, batching=batching)
    for score in (maml.evaluate, maml.meta_backward):
        with pytest.raises(NonFiniteLossError, match="task 1 "):
            score(_linear_tasks(nan=True))
    assert maml.evaluate(_linear_tasks())["loss"].isfinite().all()


def test_protonet_evaluate_refuses_nan_images_rather_than_score_argmax():
    images = torch.rand(3, 4, 1, 8, 8)
    images[0, 0, 0, 0, 0] = float("nan")
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4))
    labels = torch.arange(3).repeat_interleave(2)[None]
    x = images.view(1, 12, 1, 8, 8)
    tasks = TaskBatch(x[:, :6], labels, x[:, 6:], labels)
    with pytest.raises(NonFiniteLossError):
        ProtoNet(net, ways=3).evaluate(tasks, {"accuracy": msr.accuracy})


def test_adapt_inside_your_own_vmap_refuses_torch_batchnorm():
    """Such a meta-gradient was 1.2e-3 off the higher oracle; MAML's own vmap path refused it."""
    net = torch.nn.Sequential(
        torch.nn.Linear(5, 2), torch.nn.BatchNorm1d(2, track_running_stats=False)
    )
    maml = MAML(net, F.mse_loss, batching="loop")
    tasks = _linear_tasks()

    def adapted_loss(x, y, xq, yq):
        fast = maml.adapt(x, y, create_graph=True)
        return F.mse_loss(maml(xq, params=fast), yq)

    with pytest.raises(ValueError, match="torch BatchNorm, whose second-order gradients"):
        torch.func.vmap(adapted_loss)(*tasks)
    maml.adapt(*tasks.task(0)[:2], create_graph=True)  # one task, outside vmap: fine


@pytest.mark.parametrize(
    "rule, message",
    [
        (lambda fast, grads, step: {n: p - 0.1 * grads[n] for n, p in fast.items()}, None),
        (lambda fast, grads, step: {n: (p - grads[n])[:1] for n, p in fast.items()}, "returned"),
        (lambda fast, grads, step: dict(list(fast.items())[:1]), "a tensor for each fast"),
        (lambda fast, grads, step: [p for p in fast.values()], "a tensor for each fast"),
    ],
)
def test_an_inner_update_must_give_every_fast_parameter_a_tensor_of_its_shape(rule, message):
    maml = MAML(torch.nn.Sequential(torch.nn.Linear(5, 2)), F.mse_loss, inner_update=rule)
    if message is None:
        maml.meta_backward(_linear_tasks())
        return
    for batching in ("vmap", "loop"):
        maml.batching = batching
        with pytest.raises(ValueError, match=message):
            maml.meta_backward(_linear_tasks())


def test_booleans_are_not_numbers():
    with pytest.raises(ValueError, match="inner_lr must be a positive finite number, got True"):
        MAML(torch.nn.Linear(2, 2), F.mse_loss, inner_lr=True)


def _npz(path, images, **extra):
    arrays = {
        "images": images,
        "alphabet_index": np.zeros(len(images), dtype=np.int64),
        "character_in_alphabet": np.arange(1, len(images) + 1),
        "split": np.zeros(len(images), dtype=np.int64),
        "alphabet_names": np.array(["Greek"]),
        **extra,
    }
    np.savez(path, **arrays)
    return path


def test_an_omniglot_npz_maps_uint8_and_unit_floats_alike_and_refuses_the_rest(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (2, 3, 28, 28), dtype=np.uint8)
    as_bytes = load_omniglot(_npz(tmp_path / "a.npz", pixels), "background")
    as_floats = load_omniglot(_npz(tmp_path / "b.npz", pixels / 255.0), "background")
    torch.testing.assert_close(as_floats.flat, as_bytes.flat)  # was 1 - x / 255: near constant
    cases = {
        "nan.npz": (np.full((2, 3, 28, 28), np.nan), "NaN or infinite"),
        "scaled.npz": (pixels.astype(np.float32), r"must lie in \[0, 1\], found 0 .. 255"),
        "signed.npz": (pixels.astype(np.int16), "pixels of type int16"),
    }
    for name, (images, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            load_omniglot(_npz(tmp_path / name, images), "background")


def test_a_pickled_npz_is_refused_without_numpys_advice(tmp_path):
    names = np.array([{"a": 1}], dtype=object)  # np.savez pickles an object array
    path = _npz(tmp_path / "objects.npz", np.zeros((2, 3, 28, 28), np.uint8), alphabet_names=names)
    with pytest.raises(ValueError) as refused:
        load_omniglot(path, "background")
    assert "pickled Python objects, which are never loaded" in str(refused.value)
    assert "allow_pickle" not in str(refused.value)


@pytest.mark.parametrize("kind", ["L", "I;16", "F", "1", "RGB", "P"])
def test_image_files_of_every_bit_depth_map_their_range_to_0_1(tmp_path, kind):
    ramp = np.linspace(0, 1, 16 * 16).reshape(16, 16)
    image = {
        "L": lambda: Image.fromarray((ramp * 255).round().astype(np.uint8)),
        "I;16": lambda: Image.fromarray((ramp * 65535).round().astype(np.uint16)),
        "F": lambda: Image.fromarray(ramp.astype(np.float32)),
        "1": lambda: Image.fromarray(ramp >= 0.5).convert("1"),
        "RGB": lambda: Image.fromarray((ramp * 255).round().astype(np.uint8)).convert("RGB"),
        "P": lambda: Image.fromarray((ramp * 255).round().astype(np.uint8)).convert("P"),
    }[kind]()
    path = tmp_path / ("image.tiff" if kind == "F" else "image.png")
    image.save(path)
    for mode in ("L", "RGB"):
        pixels = read_image(path, mode, 16)
        assert pixels.min() == 0 and pixels.max() == 1, (kind, mode)  # I;16 was all 1
        assert abs(pixels.mean().item() - 0.5) < 0.02, (kind, mode)


def test_dataset_images_outside_0_1_are_refused():
    with pytest.raises(ValueError, match=r"dataset item 0: float pixels must lie in \[0, 1\]"):
        ImageClasses.from_dataset([(torch.full((1, 4, 4), 255.0), 0), (torch.zeros(1, 4, 4), 1)])


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that declares ``width`` x ``height`` pixels in a few bytes: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grey
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def test_a_decompression_bomb_in_an_image_folder_is_refused_by_name(tmp_path):
    folder = tmp_path / "classes" / "a"
    folder.mkdir(parents=True)
    bomb = _png_header(folder / "huge.png", 40_000, 40_000)  # 1.6e9 pixels, 60 bytes
    assert bomb.stat().st_size < 100
    with pytest.raises(ValueError, match=rf"refusing image {bomb}: Image size \(1600000000 pix"):
        ImageClasses.from_folder(tmp_path / "classes", 8)
