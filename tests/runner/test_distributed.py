"""Two gloo processes on this machine give the same meta-gradient and scores as one process;
every driver runs under torchrun like one process, writes --out once, stops on any rank's
signal and resumes to the same end; a killed or frozen rank ends the run with one line."""

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
from run_records import SYNTHETIC_TINY, children, logged_metrics

import msr
from msr import MAML, MSRLinear, TaskBatch
from msr.distributed import (
    average_gradients,
    rank_and_world_size,
    shard_tasks,
    sharded_evaluate,
    sharded_map,
)


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
    tasks, extra = _tasks(), {"max_error": _max_error}
    for count in (8, 7, 1):  # even, uneven, and fewer tasks than ranks
        scores = sharded_evaluate(learner, _first(tasks, count), extra, inner_steps=3)
        results[rank, count] = {k: v.clone() for k, v in scores.items()}
    results[rank, "map"] = sharded_map(lambda index: (index, rank), 5)
    dist.barrier()  # both ranks have stored every result (the manager holds them)
    # End without tearing gloo down: its teardown aborted a rank now and then ("terminate
    # called without an active exception", even after a barrier and destroy_process_group),
    # which is torch's, not what this test checks. The drivers' teardown is tested below.
    os._exit(0)


def _first(tasks: TaskBatch, count: int) -> TaskBatch:
    return TaskBatch(*(t[:count] for t in tasks))


def _max_error(prediction, target):
    return (prediction - target).abs().max()


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
    reference.zero_grad()
    for count in (8, 7, 1):
        alone = reference.evaluate(
            _first(_tasks(), count), {"max_error": _max_error}, inner_steps=3
        )
        for rank in (0, 1):  # every rank holds every task's scores, in task order
            shared = per_rank[rank, count]
            assert shared.keys() == alone.keys() and shared["loss"].shape == (count,)
            for name in alone:
                torch.testing.assert_close(shared[name], alone[name], rtol=0, atol=1e-12)
    assert sharded_evaluate(reference, _tasks())["loss"].equal(reference.evaluate(_tasks())["loss"])
    for rank in (0, 1):  # in index order on every rank, index i computed by rank i % 2
        assert per_rank[rank, "map"] == [(0, 0), (1, 1), (2, 0), (3, 1), (4, 0)]
    assert sharded_map(lambda index: index * index, 3) == [0, 1, 4]  # no process group


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


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
# Each driver at its tiny preset (the rotation driver's tiny meta-batch of 3 would not split
# over 2 ranks), and the steps of a run that a stop lands in long before its end.
DRIVERS = {
    "few_shot": ["experiments.few_shot", "--method", "msr", "--preset", "tiny"],
    "synthetic": [
        *("experiments.synthetic", "--preset", "tiny", "--methods", "MSR-FC", "--k", "1"),
        *("--seed", "2"),
    ],
    "rotation": [
        *("experiments.rotation", "--preset", "tiny", "--methods", "MSR-Conv", "--group", "c8"),
        *("--protocols", "swept", "--set", "meta_batch=4"),
    ],
}
LONG_STEPS = "100000"


def _without_times(results: dict) -> list[dict]:
    return [{k: v for k, v in run.items() if k != "wall_s"} for run in results["runs"]]


# Learned values that Adam moves on rounding noise: BatchNorm cancels a conv bias and a channel's
# scale (U_out's singular values), so their gradients are rounding noise alone, which Adam turns
# into steps of up to its lr (1e-3 per step) that differ between one and two ranks. They also
# move the few-shot losses by up to ~2e-5 (BatchNorm's eps keeps the cancellation inexact).
NOISE_DRIVEN = ("inner_lrs", "factor_singular_values")


def _differing(ours, theirs, path="") -> list[str]:
    """Where ``ours`` and ``theirs`` differ by more than float rounding (a sum over two ranks
    is ordered otherwise than over one), or than Adam's steps on it (``NOISE_DRIVEN``)."""
    if isinstance(theirs, float):
        loose = any(f".{name}." in path for name in NOISE_DRIVEN)
        return (
            [] if ours == pytest.approx(theirs, rel=1e-4, abs=1e-3 if loose else 1e-7) else [path]
        )
    if isinstance(theirs, dict) and isinstance(ours, dict) and ours.keys() == theirs.keys():
        return [p for key in theirs for p in _differing(ours[key], theirs[key], f"{path}.{key}")]
    if isinstance(theirs, list) and isinstance(ours, list) and len(ours) == len(theirs):
        pairs = enumerate(zip(ours, theirs, strict=True))
        return [p for index, (a, b) in pairs for p in _differing(a, b, f"{path}[{index}]")]
    return [] if ours == theirs else [path]


def _launch(command, out, private, *options, wait=True):
    """``command`` into ``out``; rank 1's private folder goes under ``private``."""
    environment = {**os.environ, "TMPDIR": str(private), "OMP_NUM_THREADS": "1"}
    full = [*command, "--out", str(out), *options]
    if not wait:
        return subprocess.Popen(
            full, cwd=REPO_ROOT, env=environment, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
    done = subprocess.run(
        full, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done


def _rank_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of the torchrun worker of ``rank`` (a child of the launcher), or None yet."""
    for pid in children(launcher_pid):
        try:
            variables = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in variables:
            return pid
    return None


def started_rank1(launcher_pid: int, private: Path) -> int:
    """The pid of rank 1 once it holds its private folder (both ranks have started)."""
    deadline = time.monotonic() + 120
    while not list(private.glob("msr-rank1-*/.lock")) and time.monotonic() < deadline:
        time.sleep(0.01)
    rank1 = _rank_pid(launcher_pid, 1)
    assert rank1 is not None
    return rank1


def _checkpoint_steps(out: Path) -> list[int]:
    return [msr.saving.read(path)["metadata"]["step"] for path in out.glob("*/model.pt")]


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
@pytest.mark.parametrize("driver", DRIVERS)
def test_a_driver_under_torchrun_runs_like_one_process_and_resumes_after_a_stop(driver, tmp_path):
    """Two gloo ranks (the meta-batch, validation and test split between them) end where one
    process ends; only rank 0 writes --out; a SIGTERM to rank 1 alone stops both at the same
    step with a checkpoint, and --resume under torchrun ends identical to an uninterrupted
    two-rank run."""
    arguments, private = DRIVERS[driver], tmp_path / "private"
    private.mkdir()
    single = _launch([sys.executable, "-m", *arguments], tmp_path / "one", private)
    pair = [*TORCHRUN, "-m", *arguments]
    double = _launch(pair, tmp_path / "two", private)
    one, two = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("one", "two"))
    differing = _differing(_without_times(two), _without_times(one))
    assert differing == [], differing
    metrics = logged_metrics(tmp_path / "two")
    assert _differing(metrics, logged_metrics(tmp_path / "one")) == []
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir()
    )  # rank 0's files alone, as one process writes them
    assert double.stdout.count("Meta-test") == single.stdout.count("Meta-test") == 1
    assert not list(private.glob("msr-rank*"))  # rank 1's private folder is gone

    # A stop once both ranks have started (rank 1 holds its private folder), in a run far too
    # long to end first; it lands within the preset's steps, so --resume with them ends as
    # the uninterrupted run above did.
    stopped = tmp_path / "stopped"
    launcher = _launch(pair, stopped, private, "--steps", LONG_STEPS, wait=False)
    rank1 = started_rank1(launcher.pid, private)
    signal_sent = time.monotonic()
    os.kill(rank1, signal.SIGTERM)
    _, err = launcher.communicate(timeout=120)
    assert time.monotonic() - signal_sent < 30
    assert err.count("stopped by SIGTERM") == 2, err  # rank 0 too, though it got no signal
    assert "gloo" not in err and "Connection closed" not in err, err
    assert json.loads((stopped / "results.json").read_text())["runs"] == []
    # the job's checkpoint, at the step both ranks stopped at; none where the stop landed in
    # the rotation driver's inner-lr sweep, which is seeded and is run again on resume
    assert all(0 <= step <= one["config"]["steps"] for step in _checkpoint_steps(stopped))
    assert _checkpoint_steps(stopped) or driver == "rotation"
    resumed = _launch(pair, stopped, private, "--resume")
    assert resumed.stdout.count("Meta-test") == 1
    assert _without_times(json.loads((stopped / "results.json").read_text())) == _without_times(two)
    assert logged_metrics(stopped) == metrics
    assert not list(private.glob("msr-rank*"))


@pytest.mark.parametrize(
    "options, message",
    [
        ([], "a meta-batch of 3 tasks does not split evenly over 2 torchrun ranks"),
        (["--set", "meta_batch=4", "--workers", "2"], "--workers > 1 cannot be combined with"),
    ],
)
def test_what_torchrun_cannot_run_is_one_line_before_anything_is_written(
    tmp_path, monkeypatch, capsys, options, message
):
    from experiments import rotation

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; refused before joining a group
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        rotation.main(["--preset", "tiny", "--out", str(out), *options])
    assert stop.value.code == 2 and not out.exists()
    assert message in capsys.readouterr().err


def test_the_ranks_torchrun_launched_are_known_before_the_group_exists(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert rank_and_world_size() == (0, 1)  # no process group: one process, as far as work goes
    assert rank_and_world_size(launched=True) == (1, 2)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert rank_and_world_size(launched=True) == (0, 1)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP])
def test_a_killed_or_frozen_torchrun_rank_ends_the_run_with_one_line(tmp_path, how):
    """A frozen rank blocked the other for gloo's 30-minute default; a killed one gave a
    traceback of gloo's 'Connection reset by peer' and left its private folder behind."""
    private = tmp_path / "private"
    private.mkdir()
    environment = {**os.environ, "TMPDIR": str(private), "OMP_NUM_THREADS": "1"}
    environment["MSR_COLLECTIVE_TIMEOUT_S"] = "5"
    command = [*TORCHRUN, "-m", "experiments.synthetic", *SYNTHETIC_TINY, "--seed", "2"]
    launcher = subprocess.Popen(
        [*command, "--steps", "100000", "--set", "meta_batch=4", "--out", str(tmp_path / "run")],
        cwd=REPO_ROOT, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    rank1 = started_rank1(launcher.pid, private)
    sent = time.monotonic()
    os.kill(rank1, how)
    try:
        _, err = launcher.communicate(timeout=180)
    finally:
        if how == signal.SIGSTOP and Path(f"/proc/{rank1}").exists():
            os.kill(rank1, signal.SIGKILL)
    assert time.monotonic() - sent < 90
    assert "rank 0 lost contact with another rank" in err, err
    assert "experiments/run.py" not in err  # no traceback of the run's (torchrun has one)
    if how == signal.SIGKILL:  # its folder stays behind: the next run's rank 1 removes it
        assert list(private.glob("msr-rank1-*"))
        rerun = subprocess.run(
            [*command, "--set", "meta_batch=4", "--out", str(tmp_path / "again")],
            cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert rerun.returncode == 0, rerun.stderr
        assert not list(private.glob("msr-rank*"))
