"""Oracles and emulations to test against: a meta-gradient computed the straightforward way
with ``higher``, and TF32 arithmetic emulated on any device.

``higher`` (unmaintained, a test dependency of this package) runs a per-task loop through a
differentiable SGD; our ``MAML`` must match it (the tests and the speed benchmark use it).
``tf32_emulation`` rounds what a GPU's tensor cores round in TF32, so that the effect of TF32
on a meta-gradient can be measured on a CPU (``benchmarks.precision``).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from msr.episodic import TaskBatch
from msr.maml import MAML


def higher_meta_backward(maml: MAML, tasks: TaskBatch) -> torch.Tensor:
    """Accumulate the meta-gradient of ``maml`` on ``tasks`` via ``higher``; return task losses."""
    import higher  # imported here: only the tests and benchmarks need it

    model = maml.model
    fast = [model.get_parameter(n) for n in maml.fast_names]
    inner_opt = torch.optim.SGD([{"params": [p]} for p in fast], lr=0.1)  # lr overridden below
    losses = []
    for xs, ys, xq, yq in zip(*tasks, strict=True):
        lrs = [maml.inner_lrs[n.replace(".", "__")] for n in maml.fast_names]
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, opt):
            for step in range(maml.inner_steps):
                lr = [lr[step] for lr in lrs] if maml.per_step_inner_lr else lrs
                opt.step(maml.inner_loss_fn(fmodel(xs), ys), override={"lr": lr})
            loss = maml.loss_fn(fmodel(xq), yq)
            (loss / tasks.num_tasks).backward()
            losses.append(loss.detach())
    return torch.stack(losses)


TF32_DROPPED_BITS = 13  # fp32 keeps 23 mantissa bits, TF32 10
ROUNDED_OPS = {F.conv2d, F.linear, torch.einsum, torch.matmul}


def round_mantissa(x: torch.Tensor, dropped_bits: int) -> torch.Tensor:
    """fp32 ``x`` rounded to nearest (ties away from zero) with its lowest mantissa bits zero."""
    if x.dtype != torch.float32 or not 0 < dropped_bits < 23:
        raise ValueError(f"needs fp32 and 0 < dropped_bits < 23, got {x.dtype}, {dropped_bits}")
    bits = x.detach().view(torch.int32)
    rounded = (bits + (1 << (dropped_bits - 1))) & ~((1 << dropped_bits) - 1)
    return rounded.view(torch.float32)


def _rounded(x: torch.Tensor, dropped_bits: int) -> torch.Tensor:
    """``x``'s value rounded, its gradient passed through (differentiable to any order)."""
    return x + (round_mantissa(x, dropped_bits) - x).detach()


class _RoundGradient(torch.autograd.Function):
    """Identity forward; rounds the gradient flowing back into the op below it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dropped_bits: int) -> torch.Tensor:
        ctx.dropped_bits = dropped_bits
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _rounded(grad, ctx.dropped_bits), None


class _TensorCoreRounding(TorchFunctionMode):
    """Rounds the multiplied inputs of ``ROUNDED_OPS`` and the gradients of their outputs."""

    def __init__(self, dropped_bits: int) -> None:
        super().__init__()
        self.dropped_bits = dropped_bits

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in ROUNDED_OPS:
            return func(*args, **kwargs)

        def round_input(a):
            is_fp32 = isinstance(a, torch.Tensor) and a.dtype == torch.float32
            return _rounded(a, self.dropped_bits) if is_fp32 else a

        # the multiplied operands: all of einsum's; input and weight of the others (a bias is
        # added in fp32 after the tensor-core product, as TF32 does)
        multiplied = len(args) if func is torch.einsum else 2
        args = (*map(round_input, args[:multiplied]), *args[multiplied:])
        return _RoundGradient.apply(func(*args, **kwargs), self.dropped_bits)


def tf32_emulation() -> contextlib.AbstractContextManager:
    """TF32 on any device: multiplied fp32 inputs and incoming gradients rounded to 10 bits."""
    return _TensorCoreRounding(TF32_DROPPED_BITS)
