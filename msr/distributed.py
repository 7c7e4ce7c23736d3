"""Data-parallel meta-learning: the tasks of a meta-batch sharded over ``torch.distributed`` ranks.

Each rank runs ``meta_backward`` on its shard; ``average_gradients`` then all-reduces the
gradients so that every rank holds the meta-gradient of the whole meta-batch and takes the same
optimizer step. ``sharded_evaluate`` scores held-out tasks the same way: each rank adapts to its
share and every rank gets all the scores. What scales is the number of tasks per step; one
task's inner loop runs on one rank. Launch with ``torchrun --nproc-per-node N script.py``; use
the gloo backend on the CPU and nccl on GPUs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from msr.episodic import EpisodicLearner, LossFn, TaskBatch

Result = TypeVar("Result")


def shard_tasks(tasks: TaskBatch, rank: int, world_size: int) -> TaskBatch:
    """Rank ``rank``'s equal share of the meta-batch (tasks rank, rank + world_size, ...)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if tasks.num_tasks % world_size:
        raise ValueError(
            f"{tasks.num_tasks} tasks do not split evenly over {world_size} ranks; "
            "uneven shards would weight tasks unequally"
        )
    return _every_nth(tasks, rank, world_size)


def _every_nth(tasks: TaskBatch, first: int, step: int) -> TaskBatch:
    """Tasks first, first + step, ... of ``tasks``."""
    return TaskBatch(*(t[first::step] for t in tasks))


def average_gradients(module: nn.Module) -> None:
    """Replace every parameter's ``.grad`` by its mean over all ranks (one flat all-reduce)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized; call init_process_group first")
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:
        return
    flat = torch.cat([p.grad.flatten() for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        count = p.grad.numel()
        p.grad.copy_(flat[offset : offset + count].view_as(p.grad))
        offset += count


def rank_and_world_size(launched: bool = False) -> tuple[int, int]:
    """(this process's rank, the number of ranks) of the initialized process group; without one
    (0, 1), or with ``launched`` what ``torchrun`` started this process as (its ``RANK`` and
    ``WORLD_SIZE``), which a script needs before it joins the group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if launched:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    return 0, 1


def sharded_evaluate(
    learner: EpisodicLearner,
    tasks: TaskBatch,
    metrics: Mapping[str, LossFn] | None = None,
    **options: Any,
) -> dict[str, Tensor]:
    """``learner.evaluate(tasks, metrics, **options)`` with the tasks split over the ranks:
    rank r adapts to tasks r, r + N, ... and the scores are all-gathered, so every rank returns
    every task's scores in task order while N ranks take about 1/N of the time. Any number of
    tasks (a rank whose share is empty scores none). Without a process group, or with one rank,
    it is ``learner.evaluate`` itself. Every rank must call it with the same tasks."""
    rank, world_size = rank_and_world_size()
    if world_size == 1:
        return learner.evaluate(tasks, metrics, **options)
    count = tasks.num_tasks
    shares = [len(range(r, count, world_size)) for r in range(world_size)]
    names = ["loss", *(metrics or {})]
    dtype = next(learner.parameters()).dtype
    mine = torch.full((len(names), shares[0]), torch.nan, dtype=dtype, device=tasks.x_query.device)
    if shares[rank]:
        scores = learner.evaluate(_every_nth(tasks, rank, world_size), metrics, **options)
        mine[:, : shares[rank]] = torch.stack([scores[name].to(dtype) for name in names])
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(gathered, mine)
    every = mine.new_empty(len(names), count)
    for r, part in enumerate(gathered):
        every[:, r::world_size] = part[:, : shares[r]]
    return dict(zip(names, every, strict=True))


def sharded_map(function: Callable[[int], Result], count: int) -> list[Result]:
    """``[function(0), ..., function(count - 1)]`` with the indices split over the ranks (rank r
    computes r, r + N, ...) and the results, any picklable values, all-gathered in index order
    on every rank: for per-task work that is not an ``evaluate`` (e.g. a Hessian's spectrum per
    task). Without a process group, or with one rank, it is the plain list. Every rank must
    call it with the same ``count``."""
    rank, world_size = rank_and_world_size()
    if world_size == 1:
        return [function(index) for index in range(count)]
    mine = [function(index) for index in range(rank, count, world_size)]
    gathered: list[list[Result] | None] = [None] * world_size
    dist.all_gather_object(gathered, mine)
    every: list[Result] = [None] * count  # type: ignore[list-item]
    for r, part in enumerate(gathered):
        every[r::world_size] = part  # type: ignore[assignment]
    return every
