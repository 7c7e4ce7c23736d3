"""The same library and drivers on a CUDA GPU (marked ``cuda``: skipped without one, as in CI).

Run them where a GPU is: ``python -m pytest -m cuda``. Meta-gradients are compared with the
CPU's on the same tasks and the same initial weights, in full fp32 (TF32 off, as the drivers set
it); TF32 is checked separately against that fp32 reference.
"""

import copy
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from experiments.common import REPO_ROOT, resolve_device
from msr import MAML, ProtoNet, TaskBatch
from msr.data import ImageClasses, augment_images, sample_episodes
from msr.models import conv4
from msr.streams import keyed_generator
from synthetic.rotation2d import Steerable2D

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _fp32():
    resolve_device("cuda")  # TF32 off, as the drivers run
    yield
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _learner(kind: str):
    ways = 5
    if kind == "protonet":
        return ProtoNet(conv4(1, 28, hidden=16), ways)
    method, batching = kind.split("-")
    model = conv4(1, 28, hidden=16, ways=ways, learn_symmetry=method == "msr")
    return MAML(model, F.cross_entropy, batching=batching)


def _tasks(device: torch.device) -> TaskBatch:
    images = torch.rand(20, 6, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    classes = ImageClasses(images, tuple(map(str, range(20))))
    tasks = sample_episodes(classes, 4, 5, 1, 3, torch.Generator().manual_seed(2), augment_images)
    return TaskBatch(*(t.to(device) for t in tasks))


def _meta_gradients(learner, tasks: TaskBatch) -> dict[str, torch.Tensor]:
    learner.zero_grad()
    learner.meta_backward(tasks)
    return {n: p.grad.detach().cpu() for n, p in learner.named_parameters() if p.grad is not None}


def _relative_errors(ours: dict, reference: dict) -> dict[str, float]:
    assert ours.keys() == reference.keys()
    return {
        n: ((ours[n] - g).norm() / g.norm().clamp_min(1e-30)).item() for n, g in reference.items()
    }


@pytest.mark.parametrize("kind", ["maml-vmap", "maml-loop", "msr-loop", "msr-vmap", "protonet"])
def test_meta_gradients_on_cuda_equal_the_cpus(kind):
    learner = _learner(kind)
    on_cuda = copy.deepcopy(learner).to(CUDA)
    errors = _relative_errors(
        _meta_gradients(on_cuda, _tasks(CUDA)), _meta_gradients(learner, _tasks("cpu"))
    )
    assert max(errors.values()) < 1e-5, errors


def test_tf32_meta_gradients_stay_within_one_percent_of_fp32():
    learner = _learner("msr-loop").to(CUDA)
    fp32 = _meta_gradients(learner, _tasks(CUDA))
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    errors = _relative_errors(_meta_gradients(learner, _tasks(CUDA)), fp32)
    assert max(errors.values()) < 1e-2, errors


def test_a_few_shot_training_step_copies_nothing_between_host_and_device():
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


def test_steerable_tasks_on_cuda_are_the_lifting_convolutions_they_claim():
    data = Steerable2D(group_name="d8", num_tasks=20, device=CUDA)
    tasks, coefficients = data.tasks(torch.arange(3))
    assert tasks.y_query.device.type == "cuda" and coefficients.device.type == "cuda"
    kernels = data.weights(coefficients)
    for t in range(3):
        x = tasks.x_query[t]
        torch.testing.assert_close(tasks.y_query[t], F.conv2d(x, kernels[t]))
        for g in data.group.grid_elements:
            moved = F.conv2d(data.group.transform(x, g), kernels[t])
            assert (moved - data.group.act_regular(tasks.y_query[t], g)).abs().max() < 1e-4


def _run(driver: str, *arguments) -> dict:
    command = [sys.executable, "-m", driver, "--preset", "tiny", *map(str, arguments)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done


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


@pytest.mark.parametrize("first, then", [("cpu", "cuda"), ("cuda", "cpu")])
def test_few_shot_resumes_on_another_device(tmp_path, first, then):
    common = ("experiments.few_shot", "--method", "msr", "--out", tmp_path)
    _run(*common, "--steps", "2", "--device", first)
    _run(*common, "--resume", "--device", then)
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["device"] == str(resolve_device(then)) and result["steps"] == 4
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4]
