"""1-D regression tasks with full (k=1) or partial (k>1) translation symmetry (MSR Table 1).

Every task is a 'valid' 1-D locally connected layer y[p] = sum_j F[p, j] x[p + j] with filters
F = C B: the connectivity C (out_length x k, rows = softmax of Gaussian logits) is drawn once per
data set, B ~ N(0, 1) (k x kernel_size) once per task. For k=1, C is all ones, so every position
shares one filter w = B[0] ~ N(0, I): a convolution. Inputs are x ~ N(0, I), with no noise.

Tasks are generated on demand from (seed, task index), so nothing is stored: the same index
always gives the same task, training batches stream from the first 80% of the indices and the
fixed held-out test tasks are the first ones of the last 20%.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from msr.maml import TaskBatch
from msr.validation import check_positive_int

RANKS = (1, 2, 5)


@dataclass(frozen=True)
class Translation1D:
    """A data set of 1-D translation tasks; see the module docstring for the generator."""

    k: int
    seed: int = 0
    in_length: int = 70
    kernel_size: int = 3
    examples_per_task: int = 20
    num_tasks: int = 10_000
    train_fraction: float = 0.8

    def __post_init__(self) -> None:
        check_positive_int("k", self.k)
        check_positive_int("in_length", self.in_length)
        check_positive_int("kernel_size", self.kernel_size)
        check_positive_int("examples_per_task", self.examples_per_task)
        check_positive_int("num_tasks", self.num_tasks)
        if self.kernel_size > self.in_length:
            raise ValueError(f"kernel_size={self.kernel_size} > in_length={self.in_length}")
        if not 0 < self.num_train_tasks < self.num_tasks:
            raise ValueError(
                f"train_fraction={self.train_fraction} leaves no train or no test tasks "
                f"out of num_tasks={self.num_tasks}"
            )

    @property
    def out_length(self) -> int:
        return self.in_length - self.kernel_size + 1

    @property
    def num_train_tasks(self) -> int:
        return round(self.num_tasks * self.train_fraction)

    @cached_property
    def connectivity(self) -> Tensor:
        """C, shape (out_length, k): how each position mixes the k task filters."""
        if self.k == 1:
            return torch.ones(self.out_length, 1)
        generator = torch.Generator().manual_seed(_mix(self.seed, -1))
        logits = torch.randn(self.out_length, self.k, generator=generator)
        return torch.softmax(logits, dim=1)

    def true_basis(self) -> Tensor:
        """Basis of every weight matrix the generator can produce, shape (out*in, k*kernel)."""
        out, inp, ker = self.out_length, self.in_length, self.kernel_size
        basis = torch.zeros(out, inp, self.k, ker)
        rows = torch.arange(out)
        for j in range(ker):
            basis[rows, rows + j, :, j] = self.connectivity
        return basis.reshape(out * inp, self.k * ker)

    def weights(self, coefficients: Tensor) -> Tensor:
        """Dense layer weights (..., out, in) for per-task filter coefficients B (..., k, ker)."""
        flat = coefficients.flatten(-2) @ self.true_basis().T
        return flat.unflatten(-1, (self.out_length, self.in_length))

    def tasks(self, indices: Tensor, support: int = 1) -> tuple[TaskBatch, Tensor]:
        """The tasks at ``indices``: (support/query split, filter coefficients B (T, k, ker))."""
        if not 0 < support < self.examples_per_task:
            raise ValueError(f"support must be in [1, {self.examples_per_task - 1}], got {support}")
        indices = torch.as_tensor(indices).long().flatten()
        if indices.numel() == 0 or indices.min() < 0 or indices.max() >= self.num_tasks:
            raise ValueError(f"task indices must lie in [0, {self.num_tasks}), got {indices}")
        xs, filters = [], []
        for index in indices.tolist():
            generator = torch.Generator().manual_seed(_mix(self.seed, index))
            filters.append(torch.randn(self.k, self.kernel_size, generator=generator))
            xs.append(torch.randn(self.examples_per_task, self.in_length, generator=generator))
        x, coefficients = torch.stack(xs), torch.stack(filters)
        per_position = self.connectivity @ coefficients  # (T, out, ker)
        y = (x.unfold(-1, self.kernel_size, 1) * per_position[:, None]).sum(-1)
        split = TaskBatch(x[:, :support], y[:, :support], x[:, support:], y[:, support:])
        return split, coefficients

    def sample_train(self, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        """A meta-batch of training tasks drawn uniformly (with replacement) from the train pool."""
        check_positive_int("num_tasks", num_tasks)
        indices = torch.randint(self.num_train_tasks, (num_tasks,), generator=generator)
        return self.tasks(indices)[0]

    def test_indices(self, num_tasks: int) -> Tensor:
        """The fixed held-out test tasks: the first ``num_tasks`` of the test pool."""
        available = self.num_tasks - self.num_train_tasks
        if not 0 < num_tasks <= available:
            raise ValueError(f"num_tasks must be in [1, {available}], got {num_tasks}")
        return torch.arange(self.num_train_tasks, self.num_train_tasks + num_tasks)


def _mix(seed: int, index: int) -> int:
    """A per-(seed, index) generator seed; distinct pairs give unrelated streams."""
    return (seed * 1_000_003 + index + 1) * 2_654_435_761 % (2**63 - 1)
