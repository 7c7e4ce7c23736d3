"""Two gloo processes on this machine give the same meta-gradient as one process, and stop
together."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import REPO_ROOT
from run_records import children

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


def _rank_pid(launcher_pid, rank):
    """The pid of the torchrun worker of ``rank`` (a child of the launcher), or None yet."""
    for pid in children(launcher_pid):
        try:
            variables = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in variables:
            return pid
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
def test_sigterm_to_one_torchrun_rank_stops_both_at_the_same_step(tmp_path):
    """A signal that reaches one rank (or reaches them a step apart) must stop every rank, at
    the same step: a rank that left alone would leave the other failing in its all-reduce."""
    out = tmp_path / "run"
    command = [
        sys.executable,
        *("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"),
        *("-m", "experiments.synthetic", "--preset", "tiny", "--methods", "MSR-FC", "--k", "1"),
        *("--steps", "100000", "--out", str(out)),
    ]
    launcher = subprocess.Popen(
        command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    metrics = out / "rank1" / "metrics.jsonl"
    while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text()):
        time.sleep(0.05)  # both ranks are meta-training
    rank1 = _rank_pid(launcher.pid, 1)
    assert rank1 is not None
    signal_sent = time.monotonic()
    os.kill(rank1, signal.SIGTERM)
    _, err = launcher.communicate(timeout=120)
    assert time.monotonic() - signal_sent < 30
    assert err.count("stopped by SIGTERM") == 2, err  # rank 0 too, though it got no signal
    assert "gloo" not in err and "Connection closed" not in err, err
