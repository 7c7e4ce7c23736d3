"""The meta-training loop and command-line plumbing shared by the synthetic experiments."""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from experiments.common import MetricsLog, keep_lines, mean_ci95, provenance, write_json_atomic
from msr import MAML, TaskBatch
from msr.distributed import average_gradients, shard_tasks
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


def meta_train(
    maml: MAML,
    data: TaskPool,
    test: TaskBatch,
    cfg: TrainConfig,
    seed: int,
    log: MetricsLog,
    advance: Callable[[int], None],
    **tags: object,
) -> tuple[float, float, float]:
    """Run ``cfg.steps`` outer steps, scoring the test tasks every ``cfg.eval_every``.

    Each evaluation is a line of ``log`` (with ``tags``). Returns the final meta-test
    (mean loss, 95% CI half-width, wall seconds).
    """
    optimizer = torch.optim.Adam(maml.parameters(), lr=cfg.outer_lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, cfg.steps, eta_min=cfg.outer_lr * cfg.final_lr_fraction
    )
    sampler = torch.Generator().manual_seed(seed)  # every rank draws the same meta-batch ...
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    start = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        optimizer.zero_grad()
        tasks = data.sample_train(cfg.meta_batch, sampler)
        if world_size > 1:  # ... and meta-trains on its own shard of it
            tasks = shard_tasks(tasks, rank, world_size)
        train_loss = maml.meta_backward(tasks).mean()
        if not math.isfinite(train_loss.item()):
            raise RuntimeError(
                f"non-finite training loss {train_loss.item()} at step {step} ({tags}); the runs "
                "finished before this one are kept in results.json"
            )
        if world_size > 1:
            average_gradients(maml)
        optimizer.step()
        schedule.step()
        advance(1)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            mse, ci95 = mean_ci95(maml.evaluate(test)["loss"])
            log.write(
                **tags,
                step=step,
                train_loss=train_loss.item(),
                test_mse=mse,
                test_ci95=ci95,
                elapsed_s=time.perf_counter() - start,
            )
    return mse, ci95, time.perf_counter() - start


Job = Callable[[MetricsLog, Callable[[int], None]], dict[str, Any]]


def run_jobs(
    jobs: Sequence[tuple[dict[str, Any], Job]],
    cfg: TrainConfig,
    args: argparse.Namespace,
    previous: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run each (tags, job) under one progress bar, logging to ``args.out/metrics.jsonl``.

    ``tags`` (e.g. ``{"method": "MSR-FC", "k": 1}``) name a job; its results.json entry and its
    metrics lines carry them. ``results.json`` is rewritten (atomically) after every job, so
    finished runs survive a crash; given the ``previous`` results (``--resume``), jobs already
    there are skipped and the metrics of a job cut off midway are dropped: it reruns from its
    start, and every job seeds itself, so the outcome equals an uninterrupted run.
    """
    args.out.mkdir(parents=True, exist_ok=True)
    metrics_path = args.out / "metrics.jsonl"
    results: dict[str, Any] = {
        **provenance(args.seed, args.preset),
        "config": asdict(cfg),
        "runs": [],
        "wall_s": 0.0,
    }
    keys = list(jobs[0][0]) if jobs else []  # the tag names, shared by every job
    if previous is None:
        metrics_path.unlink(missing_ok=True)
    else:
        results.update(runs=previous["runs"], wall_s=previous["wall_s"])
        keep_lines(metrics_path, lambda record: _finished(record, results["runs"], keys))
    prior_wall, start = results["wall_s"], time.perf_counter()
    with (
        MetricsLog(metrics_path) as log,
        tqdm(
            total=len(jobs) * cfg.steps,
            desc="meta-training",
            unit="step",
            disable=dist.is_initialized() and dist.get_rank() > 0,
        ) as bar,
    ):
        for tags, job in jobs:
            if _finished(tags, results["runs"], keys):
                bar.update(cfg.steps)
                continue
            bar.set_postfix_str(" ".join(str(v) for v in tags.values()))
            results["runs"].append(job(log, bar.update))
            results["wall_s"] = prior_wall + time.perf_counter() - start
            write_json_atomic(args.out / "results.json", results)
    results["wall_s"] = prior_wall + time.perf_counter() - start
    write_json_atomic(args.out / "results.json", results)
    return results


def _finished(
    record: Mapping[str, Any], runs: Sequence[Mapping[str, Any]], keys: Sequence[str]
) -> bool:
    """Whether a finished run has the same values as ``record`` (a job's tags or a metrics line)
    under the tag ``keys``."""
    return any(all(run.get(k) == record.get(k) for k in keys) for run in runs)


def resume_from(
    parser: argparse.ArgumentParser, args: argparse.Namespace, cfg: TrainConfig
) -> dict[str, Any] | None:
    """With ``--resume``, the finished runs in ``args.out/results.json``, checked to belong to
    this run (same preset, seed, config and code); ``None`` without it."""
    if not args.resume:
        return None
    path = args.out / "results.json"
    if not path.exists():
        parser.error(f"--resume given but {path} does not exist")
    previous = json.loads(path.read_text())
    expected = {**provenance(args.seed, args.preset), "config": asdict(cfg)}
    different = {k: (previous.get(k), v) for k, v in expected.items() if previous.get(k) != v}
    if different:
        parser.error(f"{path} belongs to another run; differing (theirs, ours): {different}")
    return previous


def summary_header(cfg: TrainConfig, args: argparse.Namespace, results: dict[str, Any]) -> str:
    """The line above a results table: what was measured, with which preset, seed and time."""
    return (
        f"\nMeta-test MSE ± 95% CI over {cfg.test_tasks} held-out tasks "
        f"(preset {args.preset}, seed {args.seed}, {cfg.steps} outer steps, "
        f"wall {results['wall_s']:.0f} s):\n"
    )


def setup_distributed(args: argparse.Namespace) -> int:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1); return the rank.

    Ranks other than 0 write their files under ``args.out/rank<r>`` and show no progress bar.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    if rank:
        args.out = args.out / f"rank{rank}"
    return rank


def add_run_arguments(parser: argparse.ArgumentParser, presets: Mapping[str, TrainConfig]) -> None:
    """The options every synthetic driver takes."""
    parser.add_argument("--preset", choices=sorted(presets), default="quick")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--steps", type=int, help="override the preset's outer steps")
    parser.add_argument("--batching", choices=("vmap", "loop"), help="override the preset")
    parser.add_argument("--inner-lr", type=float, help="override the initial inner lr")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs already in DIR/results.json (same preset, seed, config and code) and "
        "run the rest; a run cut off midway restarts from its beginning",
    )


def resolve_config(
    parser: argparse.ArgumentParser, args: argparse.Namespace, presets: Mapping[str, TrainConfig]
) -> TrainConfig:
    """The preset named on the command line, with its overrides applied."""
    cfg = presets[args.preset]
    if args.steps is not None:
        if args.steps < 1:
            parser.error(f"--steps must be positive, got {args.steps}")
        cfg = replace(cfg, steps=args.steps, eval_every=min(cfg.eval_every, args.steps))
    if args.batching is not None:
        cfg = replace(cfg, batching=args.batching)
    if args.inner_lr is not None:
        if not args.inner_lr > 0:
            parser.error(f"--inner-lr must be positive, got {args.inner_lr}")
        cfg = replace(cfg, inner_lr=args.inner_lr)
    return cfg
