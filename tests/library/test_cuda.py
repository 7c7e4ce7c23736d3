"""The same library and drivers on a CUDA GPU (marked ``cuda``: skipped without one, as in CI).

Run them where a GPU is: ``python -m pytest -m cuda``. Meta-gradients on the same tasks and
initial weights are compared two ways: in fp64, CUDA's must equal the CPU's to 1e-9 (the same
computation); in fp32 (TF32 off, as the drivers run), CUDA's must be within 1e-5 of the exact
(fp64) ones, as the CPU's are (the unmarked tests, run everywhere), so the two devices' fp32
meta-gradients agree to 2e-5.
"""

import copy
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT
from torch import nn

from msr import MAML, ProtoNet, TaskBatch
from msr.data import ImageClasses, augment_images, sample_episodes
from msr.devices import resolve_device
from msr.models import conv4
from msr.streams import keyed_generator
from synthetic.rotation2d import Steerable2D

cuda = pytest.mark.cuda
CUDA = torch.device("cuda")


@pytest.fixture
def fp32_on_cuda():
    resolve_device("cuda")  # TF32 off, as the drivers run


def smooth_conv4(*args, **kwargs) -> nn.Sequential:
    """Conv-4 with GELU for ReLU and average for max pooling: a smooth meta-gradient.

    ReLU and max-pool make the meta-gradient only piecewise smooth, and a rounding difference
    can switch a piece: fp32 against fp64 on the CPU moved it by up to 3e-3 for 3 of 125
    (kind, seed) pairs. With this backbone fp32's error stays at rounding level (at most 4.1e-6
    over the same 125), so it can be held to 1e-5 on every device.
    """
    model = conv4(*args, **kwargs)
    for index, layer in enumerate(model):
        if isinstance(layer, nn.ReLU):
            model[index] = nn.GELU()
        elif isinstance(layer, nn.MaxPool2d):
            model[index] = nn.AvgPool2d(2)
    return model


def _learner(kind: str, backbone=conv4):
    ways = 5
    if kind == "protonet":
        return ProtoNet(backbone(1, 28, hidden=16), ways)
    method, batching = kind.split("-")
    model = backbone(1, 28, hidden=16, ways=ways, learn_symmetry=method == "msr")
    return MAML(model, F.cross_entropy, batching=batching)


def _tasks(device: torch.device, dtype: torch.dtype = torch.float32) -> TaskBatch:
    images = torch.rand(20, 6, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    classes = ImageClasses(images, tuple(map(str, range(20))))
    tasks = sample_episodes(classes, 4, 5, 1, 3, torch.Generator().manual_seed(2), augment_images)
    return tasks.to(device, dtype)


def _meta_gradients(learner, tasks: TaskBatch) -> dict[str, torch.Tensor]:
    learner.zero_grad()
    learner.meta_backward(tasks)
    return {n: p.grad.detach().cpu() for n, p in learner.named_parameters() if p.grad is not None}


def _errors(ours: dict, reference: dict) -> dict[str, float]:
    """Each parameter's meta-gradient error, relative to the norm of the whole meta-gradient.

    Not to the parameter's own gradient norm: BatchNorm makes some meta-gradients exactly zero
    (the conv biases before it and their inner lrs; the first layer's 1x1 U_in nearly so), and
    there two correct fp32 computations differ by rounding alone: by ~1e-7 of the whole
    meta-gradient, which is up to 1e18 times their own norm (measured against fp64).
    """
    assert ours.keys() == reference.keys()
    scale = torch.cat([g.flatten() for g in reference.values()]).norm()
    return {n: ((ours[n] - g).norm() / scale).item() for n, g in reference.items()}


KINDS = ["maml-vmap", "maml-loop", "msr-loop", "msr-vmap", "protonet"]


@pytest.mark.parametrize("kind", KINDS)
def test_fp32_meta_gradients_are_within_1e_5_of_exact(kind):
    learner = _learner(kind, smooth_conv4)
    exact = _meta_gradients(copy.deepcopy(learner).double(), _tasks("cpu", torch.float64))
    errors = _errors(_meta_gradients(learner, _tasks("cpu")), exact)
    assert max(errors.values()) < 1e-5, errors


@cuda
@pytest.mark.parametrize("kind", KINDS)
def test_fp32_meta_gradients_on_cuda_are_within_1e_5_of_exact(kind, fp32_on_cuda):
    learner = _learner(kind, smooth_conv4)
    exact = _meta_gradients(copy.deepcopy(learner).double(), _tasks("cpu", torch.float64))
    errors = _errors(_meta_gradients(learner.to(CUDA), _tasks(CUDA)), exact)
    assert max(errors.values()) < 1e-5, errors


@cuda
@pytest.mark.parametrize("kind", KINDS)
def test_meta_gradients_on_cuda_equal_the_cpus_in_fp64(kind):
    learner = _learner(kind).double()  # the real Conv-4: fp64 switches no ReLU or max-pool piece
    on_cuda = copy.deepcopy(learner).to(CUDA)
    errors = _errors(
        _meta_gradients(on_cuda, _tasks(CUDA, torch.float64)),
        _meta_gradients(learner, _tasks("cpu", torch.float64)),
    )
    assert max(errors.values()) < 1e-9, errors


@cuda
def test_the_drivers_device_turns_off_the_tf32_that_torch_allows_in_convolutions():
    torch.backends.cudnn.allow_tf32 = True  # torch's default
    torch.backends.cuda.matmul.allow_tf32 = True
    resolve_device("cuda")
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


@cuda
def test_a_few_shot_training_step_copies_nothing_between_host_and_device(fp32_on_cuda):
    images = torch.rand(20, 6, 1, 28, 28, device=CUDA)
    classes = ImageClasses(images, tuple(map(str, range(20))))
    learner = _learner("msr-loop").to(CUDA)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)

    def step(index: int) -> None:
        optimizer.zero_grad()
        generator = keyed_generator(0, index, CUDA)
        learner.meta_backward(sample_episodes(classes, 4, 5, 1, 3, generator, augment_images))
        optimizer.step()

    step(1)  # lazy initialization (cuBLAS handles, optimizer state) happens once
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        step(2)
        torch.cuda.synchronize()
    copies = [
        event.name
        for event in profile.events()
        if "Memcpy" in event.name and ("HtoD" in event.name or "DtoH" in event.name)
    ]
    assert not copies, copies


@cuda
def test_steerable_tasks_on_cuda_are_the_lifting_convolutions_they_claim(fp32_on_cuda):
    data = Steerable2D(group_name="d8", num_tasks=20, device=CUDA)
    tasks, coefficients = data.tasks(torch.arange(3))
    assert tasks.y_query.device.type == "cuda" and coefficients.device.type == "cuda"
    kernels = data.weights(coefficients)
    for t in range(3):
        x = tasks.x_query[t]
        # the tasks were made in one conv over support and query: cuDNN may pick another
        # algorithm for another batch size, so not bit for bit
        torch.testing.assert_close(tasks.y_query[t], F.conv2d(x, kernels[t]), rtol=1e-5, atol=1e-5)
        for g in data.group.grid_elements:
            moved = F.conv2d(data.group.transform(x, g), kernels[t])
            assert (moved - data.group.act_regular(tasks.y_query[t], g)).abs().max() < 1e-4


def _run(driver: str, *arguments) -> dict:
    command = [sys.executable, "-m", driver, "--preset", "tiny", *map(str, arguments)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done


@cuda
@pytest.mark.parametrize(
    "driver, arguments",
    [
        ("experiments.synthetic", ["--methods", "MSR-FC", "MAML-Conv", "--k", "2"]),
        ("experiments.rotation", ["--group", "c8"]),
    ],
)
def test_synthetic_drivers_run_on_cuda(tmp_path, driver, arguments):
    _run(driver, *arguments, "--device", "cuda", "--out", tmp_path)
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert runs and all(run["device"] == "cuda:0" and run["mse"] > 0 for run in runs)


@cuda
@pytest.mark.parametrize("first, then", [("cpu", "cuda"), ("cuda", "cpu")])
def test_few_shot_resumes_on_another_device(tmp_path, first, then):
    common = ("experiments.few_shot", "--method", "msr", "--out", tmp_path)
    _run(*common, "--steps", "2", "--device", first)
    _run(*common, "--resume", "--device", then)
    job = tmp_path / "msr_omniglot_5w1s_s0"
    result = json.loads((job / "result.json").read_text())["result"]
    assert result["device"] == str(resolve_device(then)) and result["steps"] == 4
    lines = [json.loads(x) for x in (job / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4]
