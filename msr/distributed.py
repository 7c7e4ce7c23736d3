"""Data-parallel meta-training: the tasks of a meta-batch sharded over ``torch.distributed`` ranks.

Each rank runs ``meta_backward`` on its shard; ``average_gradients`` then all-reduces the
gradients so that every rank holds the meta-gradient of the whole meta-batch and takes the same
optimizer step. Launch with ``torchrun --nproc-per-node N script.py``; use the gloo backend on the
CPU and nccl on GPUs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from msr.episodic import TaskBatch


def shard_tasks(tasks: TaskBatch, rank: int, world_size: int) -> TaskBatch:
    """Rank ``rank``'s equal share of the meta-batch (tasks rank, rank + world_size, ...)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if tasks.num_tasks % world_size:
        raise ValueError(
            f"{tasks.num_tasks} tasks do not split evenly over {world_size} ranks; "
            "uneven shards would weight tasks unequally"
        )
    return TaskBatch(*(t[rank::world_size] for t in tasks))


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
