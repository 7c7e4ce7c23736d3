"""1-D regression tasks with full (k=1) or partial (k>1) translation symmetry (MSR Table 1).

Every task is a 'valid' 1-D locally connected layer y[p] = sum_j F[p, j] x[p + j] with filters
F = C B: the connectivity C (out_length x k, rows = softmax of Gaussian logits) is drawn once per
data set, B ~ N(0, 1) (k x kernel_size) once per task. For k=1, C is all ones, so every position
shares one filter w = B[0] ~ N(0, I): a convolution. Inputs are x ~ N(0, I), with no noise.
Tasks stream from a ``TaskPool``: generated on demand, never stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from msr.validation import check_positive_int
from synthetic.pool import TaskPool

RANKS = (1, 2, 5)


@dataclass(frozen=True)
class Translation1D(TaskPool):
    """A data set of 1-D translation tasks of rank ``k``; see the module docstring."""

    k: int
    in_length: int = 70
    kernel_size: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("k", self.k)
        check_positive_int("in_length", self.in_length)
        check_positive_int("kernel_size", self.kernel_size)
        if self.kernel_size > self.in_length:
            raise ValueError(f"kernel_size={self.kernel_size} > in_length={self.in_length}")

    @property
    def out_length(self) -> int:
        return self.in_length - self.kernel_size + 1

    @cached_property
    def connectivity(self) -> Tensor:
        """C, shape (out_length, k): how each position mixes the k task filters."""
        if self.k == 1:
            return torch.ones(self.out_length, 1, device=self.device)
        # drawn on the CPU: the same data set structure on every device
        generator = self.generator(-1, device="cpu")
        logits = torch.randn(self.out_length, self.k, generator=generator, device="cpu")
        return torch.softmax(logits, dim=1).to(self.device)

    def true_basis(self) -> Tensor:
        """Basis of every weight matrix the generator can produce, shape (out*in, k*kernel)."""
        out, inp, ker = self.out_length, self.in_length, self.kernel_size
        basis = torch.zeros(out, inp, self.k, ker, device=self.device)
        rows = torch.arange(out, device=self.device)
        for j in range(ker):
            basis[rows, rows + j, :, j] = self.connectivity
        return basis.reshape(out * inp, self.k * ker)

    def weights(self, coefficients: Tensor) -> Tensor:
        """Dense layer weights (..., out, in) for per-task filter coefficients B (..., k, ker)."""
        flat = coefficients.flatten(-2) @ self.true_basis().T
        return flat.unflatten(-1, (self.out_length, self.in_length))

    def draw(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        device = generator.device
        coefficients = torch.randn(self.k, self.kernel_size, generator=generator, device=device)
        x = torch.randn(self.examples_per_task, self.in_length, generator=generator, device=device)
        return x, coefficients

    def targets(self, x: Tensor, coefficients: Tensor) -> Tensor:
        per_position = self.connectivity @ coefficients  # (T, out, ker)
        return (x.unfold(-1, self.kernel_size, 1) * per_position[:, None]).sum(-1)
