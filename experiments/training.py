"""The meta-training loop and command-line plumbing shared by the synthetic experiments."""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import signal
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, CancelledError, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from experiments.common import (
    DEVICE_HELP,
    OVERWRITE_HELP,
    SEED_HELP,
    TENSORBOARD_HELP,
    MetricsLog,
    differences,
    keep_freed_memory,
    keep_lines,
    launched_by_torchrun,
    mean_ci95,
    positive_finite_float,
    positive_int,
    provenance,
    read_results,
    resolve_device,
    seed_value,
    write_results,
)
from experiments.engine import NonFiniteLossError, outer_steps
from experiments.rundir import RunError, check_stop
from msr import MAML, TaskBatch
from msr.validation import check_positive_int
from synthetic.pool import TaskPool


@dataclass(frozen=True)
class TrainConfig:
    """One preset of the protocol (1 inner SGD step, learned inner lr, Adam outer loop)."""

    steps: int
    eval_every: int
    test_tasks: int = 300
    meta_batch: int = 32
    support: int = 1
    outer_lr: float = 1e-3
    final_lr_fraction: float = 1.0  # cosine decay of the outer lr to this fraction; 1 = constant
    inner_lr: float = 0.1
    inner_steps: int = 1
    batching: str = "vmap"


def build_maml(model: torch.nn.Module, cfg: TrainConfig) -> MAML:
    """Second-order MAML with the preset's inner loop and learned per-tensor inner lrs."""
    return MAML(
        model,
        inner_steps=cfg.inner_steps,
        inner_lr=cfg.inner_lr,
        batching=cfg.batching,  # type: ignore[arg-type]
    )


def _outer_steps(
    maml: MAML,
    data: TaskPool,
    cfg: TrainConfig,
    seed: int,
    advance: Callable[[int], None],
    tags: Mapping[str, object],
) -> Iterator[tuple[int, float]]:
    """``engine.outer_steps`` for ``cfg.steps`` steps on meta-batches of training tasks drawn in
    turn from one stream seeded by ``seed`` (the same on every rank), with Adam and the
    preset's cosine schedule; yields (step, train loss) after each."""
    optimizer = torch.optim.Adam(maml.parameters(), lr=cfg.outer_lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, cfg.steps, eta_min=cfg.outer_lr * cfg.final_lr_fraction
    )
    sampler = torch.Generator().manual_seed(seed)
    for step, train_loss in outer_steps(
        maml,
        optimizer,
        lambda step: data.sample_train(cfg.meta_batch, sampler),
        range(1, cfg.steps + 1),
        what=str(dict(tags)),
        kept="the runs finished before this one are kept in results.json",
        schedule=schedule,
    ):
        advance(1)
        yield step, train_loss


def meta_train(
    maml: MAML,
    data: TaskPool,
    test: TaskBatch,
    cfg: TrainConfig,
    seed: int,
    log: MetricsLog,
    advance: Callable[[int], None],
    /,
    **tags: object,
) -> tuple[float, float, float]:
    """Run ``cfg.steps`` outer steps, scoring the test tasks every ``cfg.eval_every``.

    Each evaluation is a line of ``log`` (with ``tags``). Returns the final meta-test
    (mean loss, 95% CI half-width, wall seconds).
    """
    start = time.perf_counter()
    for step, train_loss in _outer_steps(maml, data, cfg, seed, advance, tags):
        if step % cfg.eval_every == 0 or step == cfg.steps:
            mse, ci95 = mean_ci95(maml.evaluate(test)["loss"])
            log.write(
                **tags,
                step=step,
                train_loss=train_loss,
                test_mse=mse,
                test_ci95=ci95,
                elapsed_s=time.perf_counter() - start,
            )
    return mse, ci95, time.perf_counter() - start


def sweep_inner_lr(
    build: Callable[[float], MAML],
    data: TaskPool,
    cfg: TrainConfig,
    candidates: Sequence[float],
    steps: int,
    score_tasks: int,
    seed: int,
    advance: Callable[[int], None],
    /,
    **tags: object,
) -> tuple[float, dict[str, float]]:
    """Choose the initial inner lr: meta-train a fresh model ``build(lr)`` for ``steps`` outer
    steps per candidate and score its mean query loss on the first ``score_tasks`` *training*
    tasks (never test tasks). A candidate that diverges scores ``None``.

    Returns (the best candidate, {candidate: score}).
    """
    if not candidates:
        raise ValueError("the inner-lr sweep needs at least one candidate")
    check_positive_int("steps", steps)
    if not 0 < score_tasks <= data.num_train_tasks:
        raise ValueError(f"score_tasks must be in [1, {data.num_train_tasks}], got {score_tasks}")
    scored = data.tasks(torch.arange(score_tasks), support=cfg.support)[0]
    scores: dict[str, float | None] = {}
    for lr in candidates:
        torch.manual_seed(seed)
        maml = build(lr)
        completed = 0
        try:
            for step, _ in _outer_steps(maml, data, replace(cfg, steps=steps), seed, advance, tags):
                completed = step
            score = maml.evaluate(scored)["loss"].mean().item()
        except NonFiniteLossError:
            score = math.nan
            advance(steps - completed)  # the progress bar counts the steps it skips
        scores[str(lr)] = score if math.isfinite(score) else None
    finite = [lr for lr in candidates if scores[str(lr)] is not None]
    if not finite:
        raise NonFiniteLossError(f"every inner-lr candidate diverged ({dict(tags)}): {scores}")
    return min(finite, key=lambda lr: scores[str(lr)]), scores


Job = Callable[[MetricsLog, Callable[[int], None]], dict[str, Any]]


def run_jobs(
    jobs: Sequence[tuple[dict[str, Any], Job]],
    cfg: TrainConfig,
    args: argparse.Namespace,
    previous: dict[str, Any] | None = None,
    job_steps: Callable[[dict[str, Any]], int] | None = None,
) -> dict[str, Any]:
    """Run each (tags, job) under one progress bar, logging to ``args.out/metrics.jsonl``.

    The bar counts outer steps: ``job_steps(tags)`` per job (default ``cfg.steps``).

    ``tags`` (e.g. ``{"method": "MSR-FC", "k": 1, "seed": 0}``) name a job; its results.json
    entry and its metrics lines carry them. Runs that differ only in their seed are summarized
    in results.json's ``aggregate`` (``aggregate_seeds``). ``results.json`` is rewritten
    (atomically) after every job, so finished runs survive a crash; given the ``previous``
    results (``--resume``), jobs already there are skipped and the metrics of a job cut off
    midway are dropped: it reruns from its start, and every job seeds itself, so the outcome
    equals an uninterrupted run.

    With ``args.workers`` > 1 the jobs run in that many processes (one thread each); the
    results equal a one-thread sequential run's (tested), the runs in results.json stay in job
    order, and the bar moves when a job ends. The metrics lines of jobs that ran side by side
    interleave.
    """
    args.out.mkdir(parents=True, exist_ok=True)
    metrics_path = args.out / "metrics.jsonl"
    results: dict[str, Any] = {
        **provenance(args.seeds, args.preset),
        "config": asdict(cfg),
        "runs": [],
        "aggregate": [],
        "wall_s": 0.0,
    }
    keys = list(jobs[0][0]) if jobs else []  # the tag names, shared by every job
    if previous is None:
        metrics_path.unlink(missing_ok=True)
    else:
        results.update(runs=previous["runs"], wall_s=previous["wall_s"])
        keep_lines(metrics_path, lambda record: _finished(record, results["runs"], keys))
    write_results(args.out / "results.json", results)  # a stop from here on can --resume
    steps_of = job_steps or (lambda tags: cfg.steps)
    order = {tuple(tags.values()): i for i, (tags, _) in enumerate(jobs)}
    prior_wall, start = results["wall_s"], time.perf_counter()

    def record(entry: dict[str, Any]) -> None:
        results["runs"].append(entry)  # kept in job order (runs of other jobs, resumed, last)
        results["runs"].sort(key=lambda run: order.get(tuple(run.get(k) for k in keys), len(order)))
        results["aggregate"] = aggregate_seeds(results["runs"], keys)
        results["wall_s"] = prior_wall + time.perf_counter() - start
        write_results(args.out / "results.json", results)

    with tqdm(
        total=sum(steps_of(tags) for tags, _ in jobs),
        desc="meta-training",
        unit="step",
        disable=dist.is_initialized() and dist.get_rank() > 0,
    ) as bar:
        todo = []
        for tags, job in jobs:
            if _finished(tags, results["runs"], keys):
                bar.update(steps_of(tags))
            else:
                todo.append((tags, job))
        board = args.out / "tensorboard" if args.tensorboard else None
        if args.workers > 1:
            _run_in_processes(todo, args.workers, (metrics_path, board), record, bar, steps_of)
        else:
            with MetricsLog(metrics_path, board) as log:
                for tags, job in todo:
                    bar.set_postfix_str(" ".join(str(v) for v in tags.values()))
                    record(job(log, bar.update))
    results["aggregate"] = aggregate_seeds(results["runs"], keys)
    results["wall_s"] = prior_wall + time.perf_counter() - start
    write_results(args.out / "results.json", results)
    return results


def aggregate_seeds(runs: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """One row per job that differs only in its seed (tags ``keys`` but "seed"): the mean
    meta-test MSE over seeds, its between-seed standard deviation (None for one seed) and the
    per-seed values, in run order."""
    rows: dict[tuple, dict[str, Any]] = {}
    for run in runs:
        tags = {k: run[k] for k in keys if k != "seed"}
        row = rows.setdefault(tuple(tags.values()), {**tags, "seeds": [], "mse_per_seed": []})
        row["seeds"].append(run["seed"])
        row["mse_per_seed"].append(run["mse"])
    for row in rows.values():
        values = row["mse_per_seed"]
        row["mse_mean"] = statistics.fmean(values)
        row["mse_std_between_seeds"] = statistics.stdev(values) if len(values) > 1 else None
    return list(rows.values())


def seed_table(aggregate: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: per job (its tags but the seed), the meta-test MSE over seeds as
    'mean ± between-seed standard deviation', and each seed's value."""
    tags = [k for k in aggregate[0] if k not in _AGGREGATE_FIELDS] if aggregate else []
    lines = [
        "| " + " | ".join([*tags, "MSE mean ± between-seed std", "per seed"]) + " |",
        "| --- " * (len(tags) + 2) + "|",
    ]
    for row in aggregate:
        spread = row["mse_std_between_seeds"]
        mean = f"{row['mse_mean']:.4f}" + ("" if spread is None else f" ± {spread:.4f}")
        pairs = zip(row["seeds"], row["mse_per_seed"], strict=True)
        seeds = ", ".join(f"{value:.4f} (s{seed})" for seed, value in pairs)
        lines.append("| " + " | ".join([*(str(row[k]) for k in tags), mean, seeds]) + " |")
    return "\n".join(lines)


_AGGREGATE_FIELDS = ("seeds", "mse_per_seed", "mse_mean", "mse_std_between_seeds")


def _run_in_processes(
    todo: Sequence[tuple[dict[str, Any], Job]],
    workers: int,
    logs: tuple[Path, Path | None],
    record: Callable[[dict[str, Any]], None],
    bar: tqdm,
    steps_of: Callable[[dict[str, Any]], int],
) -> None:
    """Run jobs in a pool of ``workers`` processes; record each entry as it arrives. If a job
    fails, the jobs not yet started are cancelled, the running ones still recorded, and the
    first error raised. If the run is stopped (SIGINT, SIGTERM), the workers are ended at once
    and the jobs they ran are left for ``--resume``."""
    context = multiprocessing.get_context("spawn")  # fork is unsafe with torch's threads
    failure: BaseException | None = None
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker)
    try:
        futures = {pool.submit(_run_logged, job, *logs): tags for tags, job in todo}
        running = set(futures)
        while running:  # polled, so that a stop is seen while the workers run
            finished, running = wait(running, timeout=0.2, return_when=FIRST_COMPLETED)
            for future in finished:
                try:
                    record(future.result())
                except CancelledError:
                    continue
                except Exception as error:  # re-raised below, once the running jobs are recorded
                    failure = failure or error
                    for pending in futures:
                        pending.cancel()
                bar.update(steps_of(futures[future]))
            check_stop()
    except BaseException:  # stopped: end the workers rather than wait for their jobs
        workers_alive = list(getattr(pool, "_processes", {}).values())  # no public handle
        pool.shutdown(wait=False, cancel_futures=True)
        for process in workers_alive:
            process.terminate()
        raise
    pool.shutdown()
    if failure is not None:
        raise failure


def _init_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the main process, which ends us
    torch.set_num_threads(1)
    keep_freed_memory()


def _run_logged(job: Job, metrics_path: Path, board: Path | None) -> dict[str, Any]:
    """A job in a worker process: its own handle on the shared metrics log (line appends)."""
    with MetricsLog(metrics_path, board) as log:
        return job(log, lambda steps: None)


def _finished(
    record: Mapping[str, Any], runs: Sequence[Mapping[str, Any]], keys: Sequence[str]
) -> bool:
    """Whether a finished run has the same values as ``record`` (a job's tags or a metrics line)
    under the tag ``keys``."""
    return any(all(run.get(k) == record.get(k) for k in keys) for run in runs)


def resume_from(args: argparse.Namespace, cfg: TrainConfig) -> dict[str, Any] | None:
    """With ``--resume``, the finished runs in ``args.out/results.json``, checked to belong to
    this run (same preset, seeds, config and code); ``None`` without it. A missing, corrupt or
    foreign file is a ``RunError``."""
    if not args.resume:
        return None
    path = args.out / "results.json"
    if not path.exists():
        raise RunError(f"--resume given but {path} does not exist")
    previous = read_results(path)
    if not isinstance(previous.get("runs"), list):
        raise RunError(f"{path} is not a results file of these drivers (no list of runs)")
    expected = {**provenance(args.seeds, args.preset), "config": asdict(cfg)}
    if different := differences({k: previous.get(k) for k in expected}, expected):
        raise RunError(f"{path} belongs to another run; differing (theirs, ours): {different}")
    return previous


def summary_header(cfg: TrainConfig, args: argparse.Namespace, results: dict[str, Any]) -> str:
    """The line above a results table: what was measured, with which preset, seed and time."""
    return (
        f"\nMeta-test MSE ± 95% CI over {cfg.test_tasks} held-out tasks "
        f"(preset {args.preset}, seed{'s' if len(args.seeds) > 1 else ''} "
        f"{', '.join(map(str, args.seeds))}, {cfg.steps} outer steps on "
        f"{', '.join(sorted({run.get('device', '?') for run in results['runs']}))}, "
        f"wall {results['wall_s']:.0f} s):\n"
    )


def setup_distributed(args: argparse.Namespace, device: torch.device) -> torch.device:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1); return the device
    this process trains on: on CUDA each rank takes ``cuda:LOCAL_RANK`` and nccl, on the CPU gloo.

    Ranks other than 0 write their files under ``args.out/rank<r>`` and show no progress bar.
    """
    if not launched_by_torchrun():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    if rank:
        args.out = args.out / f"rank{rank}"
    return device


def add_run_arguments(parser: argparse.ArgumentParser, presets: Mapping[str, TrainConfig]) -> None:
    """The options every synthetic driver takes."""
    parser.add_argument(
        "--preset", choices=sorted(presets), default="quick", help="the scale of the run"
    )
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=seed_value, default=0, help=SEED_HELP)
    seeds.add_argument(
        "--seeds",
        type=seed_value,
        nargs="+",
        help="run every job once per seed (each seed draws its own data and initialization); "
        "results.json gets the per-seed runs and an aggregate over seeds",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--steps", type=positive_int, help="override the preset's outer steps")
    parser.add_argument("--batching", choices=("vmap", "loop"), help="override the preset")
    parser.add_argument(
        "--inner-lr", type=positive_finite_float, help="override the initial inner lr"
    )
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--tensorboard", action="store_true", help=TENSORBOARD_HELP)
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        help="run the jobs in this many processes, one thread each (same results)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs already in DIR/results.json (same preset, seed, config and code) and "
        "run the rest; a run cut off midway restarts from its beginning",
    )
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def resolve_config(
    parser: argparse.ArgumentParser, args: argparse.Namespace, presets: Mapping[str, TrainConfig]
) -> tuple[TrainConfig, torch.device]:
    """The preset named on the command line, with its overrides applied, and the device to
    train on (joining the process group under ``torchrun``)."""
    cfg = presets[args.preset]
    args.seeds = args.seeds or [args.seed]
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must differ, got {args.seeds}")
    torchrun = launched_by_torchrun()
    if args.workers > 1 and torchrun:
        parser.error("--workers > 1 cannot be combined with torchrun (one process per rank)")
    if torchrun and args.device.startswith("cuda:"):
        parser.error(f"--device {args.device}: under torchrun each rank uses cuda:LOCAL_RANK")
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    if args.steps is not None:
        cfg = replace(cfg, steps=args.steps, eval_every=min(cfg.eval_every, args.steps))
    if args.batching is not None:
        cfg = replace(cfg, batching=args.batching)
    if args.inner_lr is not None:
        cfg = replace(cfg, inner_lr=args.inner_lr)
    return cfg, setup_distributed(args, device)
