"""Two gloo processes on this machine give the same meta-gradient as one process."""

import json
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from experiments.common import REPO_ROOT
from msr import MAML, MSRLinear, TaskBatch
from msr.distributed import average_gradients, shard_tasks


def _learner() -> MAML:
    torch.manual_seed(0)
    return MAML(MSRLinear(6, 4, 3).double(), inner_steps=2)


def _tasks() -> TaskBatch:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, 6, 6, generator=generator, dtype=torch.float64)
    y = torch.randn(8, 6, 4, generator=generator, dtype=torch.float64)
    return TaskBatch(x[:, :2], y[:, :2], x[:, 2:], y[:, 2:])


def _worker(rank: int, world_size: int, init_file: str, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    learner = _learner()
    learner.meta_backward(shard_tasks(_tasks(), rank, world_size))
    average_gradients(learner)
    results[rank] = {n: p.grad.clone() for n, p in learner.named_parameters()}
    dist.destroy_process_group()


def test_two_gloo_processes_match_one_process(tmp_path):
    reference = _learner()
    reference.meta_backward(_tasks())
    expected = {n: p.grad for n, p in reference.named_parameters()}
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), results), nprocs=2)
        per_rank = dict(results)
    for rank in (0, 1):
        for name, grad in expected.items():
            torch.testing.assert_close(per_rank[rank][name], grad, rtol=0, atol=1e-12, msg=name)


def test_sharding_checks():
    tasks = _tasks()
    assert shard_tasks(tasks, 1, 4).x_support.shape[0] == 2
    assert torch.equal(shard_tasks(tasks, 1, 4).y_query, tasks.y_query[1::4])
    with pytest.raises(ValueError, match="8 tasks do not split evenly over 3 ranks"):
        shard_tasks(tasks, 0, 3)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got 2"):
        shard_tasks(tasks, 2, 2)
    with pytest.raises(RuntimeError, match="not initialized"):
        average_gradients(_learner())


def test_torchrun_two_processes_train_like_one(tmp_path):
    """The synthetic driver under torchrun (2 gloo ranks) ends where one process ends."""
    common = [
        "-m",
        "experiments.synthetic",
        "--preset",
        "tiny",
        "--methods",
        "MSR-FC",
        "--k",
        "1",
        "--seed",
        "2",
    ]
    single = subprocess.run(
        [sys.executable, *common, "--out", str(tmp_path / "one")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
    ]
    double = subprocess.run(
        [*launcher, *common, "--out", str(tmp_path / "two")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert double.returncode == 0, double.stderr
    one = json.loads((tmp_path / "one" / "results.json").read_text())["runs"][0]
    two = json.loads((tmp_path / "two" / "results.json").read_text())["runs"][0]
    assert (tmp_path / "two" / "rank1" / "results.json").exists()
    assert abs(one["mse"] - two["mse"]) < 1e-5 * one["mse"]
