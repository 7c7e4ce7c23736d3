"""Functional MAML on ``torch.func``: adapt only the fast parameters, meta-learn everything else.

The inner loop is a pure function of (parameters, inner learning rates, one task), so a meta-batch
runs either as one ``vmap``-ed computation (``batching="vmap"``, fast for small models) or as a
loop that backpropagates after each task (``batching="loop"``, for wide/conv nets or tight memory).
Both give the same meta-gradient.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from msr.layers import SymmetryLayer

LossFn = Callable[[Tensor, Tensor], Tensor]
Batching = Literal["vmap", "loop"]


class TaskBatch(NamedTuple):
    """A meta-batch: every tensor has the task index as its leading dimension."""

    x_support: Tensor
    y_support: Tensor
    x_query: Tensor
    y_query: Tensor

    @property
    def num_tasks(self) -> int:
        return self.x_support.shape[0]

    def task(self, index: int) -> TaskBatch:
        """The single task ``index`` (no task dimension)."""
        return TaskBatch(*(t[index] for t in self))


def partition_parameters(model: nn.Module) -> tuple[list[str], list[str]]:
    """Split a model's trainable parameter names into (meta, fast).

    Meta parameters are the symmetry parameters declared by ``SymmetryLayer``s (outer loop
    only); every other trainable parameter is fast (adapted in the inner loop, its initial value
    meta-learned). Frozen symmetries are buffers and appear in neither list.
    """
    meta: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, SymmetryLayer):
            meta.update(f"{prefix}.{n}" if prefix else n for n, _ in module.meta_parameters())
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return [n for n in names if n in meta], [n for n in names if n not in meta]


class MAML(nn.Module):
    """Model-agnostic meta-learning over a model's fast parameters.

    ``maml.parameters()`` are the outer-loop variables: the model's parameters (symmetries and
    the initial fast parameters) and, when ``learn_inner_lr``, one inner learning rate per fast
    parameter tensor. Second-order meta-gradients by default; ``first_order=True`` drops the
    second-order terms. ``fast_parameters`` restricts adaptation to the named parameters
    (e.g. only the head, for ANIL).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn = F.mse_loss,
        *,
        inner_steps: int = 1,
        inner_lr: float = 0.1,
        learn_inner_lr: bool = True,
        first_order: bool = False,
        fast_parameters: Iterable[str] | None = None,
        batching: Batching = "vmap",
    ) -> None:
        super().__init__()
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 0:
            raise ValueError(f"inner_steps must be a non-negative integer, got {inner_steps!r}")
        if not inner_lr > 0:
            raise ValueError(f"inner_lr must be positive, got {inner_lr!r}")
        self.model = model
        for name, module in model.named_modules():
            if isinstance(module, _BatchNorm) and module.track_running_stats:
                raise ValueError(
                    f"{name} ({module}) tracks running statistics; a meta-model's BatchNorm must "
                    "use track_running_stats=False (or msr.TaskBatchNorm)"
                )
        self.loss_fn = loss_fn
        self.inner_steps = inner_steps
        self.first_order = first_order
        self.batching = batching
        meta, fast = partition_parameters(model)
        if fast_parameters is not None:
            requested = list(fast_parameters)
            wrong = [n for n in requested if n not in fast]
            if wrong:
                raise ValueError(
                    f"fast_parameters {wrong} are not adaptable parameters of the model "
                    f"(symmetry parameters: {meta}; adaptable: {fast})"
                )
            fast = requested
        if not fast:
            raise ValueError("the model has no fast parameters for the inner loop to adapt")
        self.fast_names: tuple[str, ...] = tuple(fast)
        dtype = model.get_parameter(fast[0]).dtype
        self.inner_lrs = nn.ParameterDict(
            {_lr_key(n): nn.Parameter(torch.tensor(float(inner_lr), dtype=dtype)) for n in fast}
        )
        self.inner_lrs.requires_grad_(learn_inner_lr)

    @property
    def batching(self) -> Batching:
        """How a meta-batch runs: ``"vmap"`` (one batched computation) or ``"loop"`` (per task)."""
        return self._batching

    @batching.setter
    def batching(self, value: Batching) -> None:
        if value not in ("vmap", "loop"):
            raise ValueError(f"batching must be 'vmap' or 'loop', got {value!r}")
        if value == "vmap":
            for name, module in self.model.named_modules():
                if isinstance(module, _BatchNorm):
                    raise ValueError(
                        f"{name} is a torch BatchNorm, whose second-order gradients are wrong "
                        "under vmap in torch 2.13; use msr.TaskBatchNorm or batching='loop'"
                    )
        self._batching = value

    def forward(self, x: Tensor) -> Tensor:
        """The unadapted model (the meta-learned initialization)."""
        return self.model(x)

    # --- the pure per-task computation -------------------------------------------------------
    def _state(self, detach: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        state = {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}
        lrs = {n: self.inner_lrs[_lr_key(n)] for n in self.fast_names}
        if detach:
            state = {n: t.detach() for n, t in state.items()}
            lrs = {n: t.detach() for n, t in lrs.items()}
        return state, lrs

    def _adapt(
        self, state: Mapping[str, Tensor], lrs: Mapping[str, Tensor], x: Tensor, y: Tensor
    ) -> dict[str, Tensor]:
        fast = {n: state[n] for n in self.fast_names}
        rest = {n: t for n, t in state.items() if n not in fast}

        def support_loss(fast_params: dict[str, Tensor]) -> Tensor:
            return self.loss_fn(functional_call(self.model, {**rest, **fast_params}, (x,)), y)

        for _ in range(self.inner_steps):
            grads = grad(support_loss)(fast)
            if self.first_order:
                grads = {n: g.detach() for n, g in grads.items()}
            fast = {n: fast[n] - lrs[n] * grads[n] for n in fast}
        return {**rest, **fast}

    def _query(
        self,
        state: Mapping[str, Tensor],
        lrs: Mapping[str, Tensor],
        x_support: Tensor,
        y_support: Tensor,
        x_query: Tensor,
        y_query: Tensor,
        metrics: Mapping[str, LossFn],
    ) -> dict[str, Tensor]:
        adapted = self._adapt(state, lrs, x_support, y_support)
        prediction = functional_call(self.model, adapted, (x_query,))
        out = {"loss": self.loss_fn(prediction, y_query)}
        out.update({name: fn(prediction, y_query) for name, fn in metrics.items()})
        return out

    def _run(
        self, tasks: TaskBatch, detach: bool, metrics: Mapping[str, LossFn], chunk_size: int | None
    ) -> dict[str, Tensor]:
        state, lrs = self._state(detach)
        query = functools.partial(self._query, metrics=metrics)
        per_task = vmap(query, in_dims=(None, None, 0, 0, 0, 0), chunk_size=chunk_size)
        return per_task(state, lrs, *tasks)

    # --- public API --------------------------------------------------------------------------
    def meta_backward(self, tasks: TaskBatch) -> Tensor:
        """Accumulate the meta-gradient of the mean query loss into ``.grad``; return task losses.

        Call ``optimizer.zero_grad()`` before and ``optimizer.step()`` after, as usual.
        """
        tasks = _check_tasks(tasks)
        if self.batching == "vmap":
            losses = self._run(tasks, detach=False, metrics={}, chunk_size=None)["loss"]
            losses.mean().backward()
            return losses.detach()
        losses = []
        for index in range(tasks.num_tasks):
            state, lrs = self._state(detach=False)
            loss = self._query(state, lrs, *tasks.task(index), {})["loss"]
            (loss / tasks.num_tasks).backward()
            losses.append(loss.detach())
        return torch.stack(losses)

    def evaluate(
        self,
        tasks: TaskBatch,
        metrics: Mapping[str, LossFn] | None = None,
        chunk_size: int | None = 64,
    ) -> dict[str, Tensor]:
        """Adapt to each task's support set and score its query set; no meta-gradient is kept.

        Returns per-task tensors: ``"loss"`` and one entry per extra metric ``fn(pred, target)``
        (metrics must be written with vmap-able torch ops, e.g. accuracy via ``argmax``).
        """
        tasks = _check_tasks(tasks)
        metrics = dict(metrics or {})
        if "loss" in metrics:
            raise ValueError("metric name 'loss' is reserved for the training loss")
        if self.batching == "vmap":
            with torch.no_grad():
                return self._run(tasks, detach=True, metrics=metrics, chunk_size=chunk_size)
        state, lrs = self._state(detach=True)
        rows = [self._query(state, lrs, *tasks.task(i), metrics) for i in range(tasks.num_tasks)]
        return {k: torch.stack([r[k].detach() for r in rows]) for k in rows[0]}

    def adapt(self, x_support: Tensor, y_support: Tensor) -> nn.Module:
        """A detached copy of the model adapted to one task's support set (for inspection)."""
        state, lrs = self._state(detach=True)
        adapted = self._adapt(state, lrs, x_support, y_support)
        clone = copy.deepcopy(self.model)
        for name, tensor in adapted.items():
            _assign(clone, name, tensor.detach())
        return clone


def _lr_key(name: str) -> str:
    return name.replace(".", "__")


def _assign(module: nn.Module, name: str, value: Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    with torch.no_grad():
        getattr(owner, leaf).copy_(value)


def _check_tasks(tasks: TaskBatch | tuple[Tensor, ...]) -> TaskBatch:
    if len(tasks) != 4:
        raise ValueError(
            f"tasks must be (x_support, y_support, x_query, y_query), got {len(tasks)}"
        )
    tasks = TaskBatch(*tasks)
    sizes = [t.shape[0] if t.dim() else None for t in tasks]
    if sizes[0] is None or sizes[0] < 1 or len(set(sizes)) != 1:
        raise ValueError(f"all task tensors need the same leading task dimension, got {sizes}")
    return tasks
