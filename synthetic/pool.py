"""A pool of synthetic tasks generated on demand from (seed, task index): nothing is stored.

The same index always gives the same task; training batches stream from the first
``train_fraction`` of the indices, and the fixed held-out test tasks are the first ones after.
Tasks are drawn directly on ``device`` from generators there: the CPU's and CUDA's random streams
differ, so the same (seed, index) gives one task per device type.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from msr.episodic import TaskBatch
from msr.streams import keyed_generator
from msr.validation import check_positive_int


@dataclass(frozen=True, kw_only=True)
class TaskPool:
    """Base of the synthetic data sets; subclasses say how one task is drawn and labelled."""

    seed: int = 0
    num_tasks: int = 10_000
    train_fraction: float = 0.8
    examples_per_task: int = 20
    device: torch.device | str = "cpu"

    def __post_init__(self) -> None:
        try:
            torch.device(self.device)
        except RuntimeError as error:
            raise ValueError(f"unknown device {self.device!r}") from error
        check_positive_int("num_tasks", self.num_tasks)
        check_positive_int("examples_per_task", self.examples_per_task)
        if not 0 < self.num_train_tasks < self.num_tasks:
            raise ValueError(
                f"train_fraction={self.train_fraction} leaves no train or no test tasks "
                f"out of num_tasks={self.num_tasks}"
            )

    @property
    def num_train_tasks(self) -> int:
        return round(self.num_tasks * self.train_fraction)

    def generator(self, index: int, device: torch.device | str | None = None) -> torch.Generator:
        """The random stream of task ``index`` on ``device`` (default: the pool's); index -1 is
        reserved for data-set-wide draws."""
        return keyed_generator(self.seed, index + 1, device or self.device)

    def draw(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """One task's (inputs (examples, ...), free coefficients); subclasses define it."""
        raise NotImplementedError

    def targets(self, x: Tensor, coefficients: Tensor) -> Tensor:
        """Targets for a batch of tasks: x (T, examples, ...), coefficients (T, ...)."""
        raise NotImplementedError

    def tasks(self, indices: Tensor, support: int = 1) -> tuple[TaskBatch, Tensor]:
        """The tasks at ``indices``: (support/query split, their coefficients)."""
        if not 0 < support < self.examples_per_task:
            raise ValueError(f"support must be in [1, {self.examples_per_task - 1}], got {support}")
        indices = torch.as_tensor(indices, device="cpu").long().flatten()  # read on the host
        if indices.numel() == 0 or indices.min() < 0 or indices.max() >= self.num_tasks:
            raise ValueError(f"task indices must lie in [0, {self.num_tasks}), got {indices}")
        drawn = [self.draw(self.generator(i)) for i in indices.tolist()]
        x = torch.stack([inputs for inputs, _ in drawn])
        coefficients = torch.stack([c for _, c in drawn])
        y = self.targets(x, coefficients)
        split = TaskBatch(x[:, :support], y[:, :support], x[:, support:], y[:, support:])
        return split, coefficients

    def sample_train(self, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        """A meta-batch of training tasks drawn uniformly (with replacement) from the train pool."""
        check_positive_int("num_tasks", num_tasks)
        indices = torch.randint(
            self.num_train_tasks, (num_tasks,), generator=generator, device=generator.device
        )
        return self.tasks(indices)[0]

    def test_indices(self, num_tasks: int) -> Tensor:
        """The fixed held-out test tasks: the first ``num_tasks`` of the test pool."""
        available = self.num_tasks - self.num_train_tasks
        if not 0 < num_tasks <= available:
            raise ValueError(f"num_tasks must be in [1, {available}], got {num_tasks}")
        return torch.arange(self.num_train_tasks, self.num_train_tasks + num_tasks, device="cpu")
