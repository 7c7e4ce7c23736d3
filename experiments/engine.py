"""The one meta-training loop every experiment runs (``outer_steps``).

A driver says which meta-batch each step trains on, what to do between steps (score, log,
checkpoint) and what to keep when a stop arrives; the loop does the steps: the stop check
(agreed between ranks under ``torchrun``), the meta-batch (each rank trains on its shard),
the outer gradient, the divergence check, the all-reduce and the optimizer and schedule steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from experiments.rundir import Stopped, requested_stop
from msr import EpisodicLearner, TaskBatch
from msr.distributed import average_gradients, shard_tasks


class NonFiniteLossError(RuntimeError):
    """A training loss became NaN or infinite (the run, or a sweep candidate, diverged)."""


def outer_steps(
    learner: EpisodicLearner,
    optimizer: torch.optim.Optimizer,
    meta_batch: Callable[[int], TaskBatch],
    steps: Iterable[int],
    *,
    what: str,
    kept: str,
    schedule: torch.optim.lr_scheduler.LRScheduler | None = None,
    on_stop: Callable[[int], None] | None = None,
) -> Iterator[tuple[int, float]]:
    """Take one outer step for each of ``steps`` on ``meta_batch(step)``; yield (step, mean
    training loss) after each, for the caller to score, log or checkpoint in between.

    A stop (SIGINT / SIGTERM) is taken before a step: ``on_stop(last finished step)`` runs
    (e.g. to checkpoint it), then ``Stopped`` is raised. A non-finite loss raises
    ``NonFiniteLossError`` naming the step, ``what`` ran (e.g. the job's tags) and what is
    ``kept``. Under ``torch.distributed`` every rank draws the same meta-batch and trains on its
    own shard of it, the gradients are averaged, and the ranks stop at the same step.
    """
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    for step in steps:
        if signum := (_agreed_stop(learner) if world_size > 1 else requested_stop()):
            if on_stop is not None:
                on_stop(step - 1)
            raise Stopped(signum)
        optimizer.zero_grad()
        tasks = meta_batch(step)
        if world_size > 1:
            tasks = shard_tasks(tasks, rank, world_size)
        loss = learner.meta_backward(tasks).mean().item()
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite training loss {loss} at step {step} ({what}); {kept}"
            )
        if world_size > 1:
            average_gradients(learner)
        optimizer.step()
        if schedule is not None:
            schedule.step()
        yield step, loss


def _agreed_stop(learner: EpisodicLearner) -> int:
    """Under torchrun, the stop every rank takes at this step: a rank that stopped alone would
    leave the others waiting in the next all-reduce until it fails. The ranks agree on the stop
    (the largest signal number any of them has seen) before each step; often one rank gets it
    alone (a signal sent to one process) or a step later than the others."""
    seen = torch.tensor([requested_stop()], device=next(learner.parameters()).device)
    dist.all_reduce(seen, op=dist.ReduceOp.MAX)
    return int(seen.item())
