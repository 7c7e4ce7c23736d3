"""Episodic meta-learners: a meta-batch of tasks, run vmapped or per task, with one interface.

A learner defines a pure per-task function ``_query(state, x_support, y_support, x_query,
y_query, metrics, in_vmap)`` of its (possibly detached) ``state``; this base class runs it over a
meta-batch, either as one ``vmap``-ed computation (``in_vmap=True``) or as a loop that
backpropagates after each task, for training (``meta_backward``) and for scoring (``evaluate``).
A learner may also run the whole meta-batch as one grouped computation (``_grouped``, with
``msr.grouped``): ``batching="grouped"``.
"""

import functools
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from msr.grouped import check_groupable

LossFn = Callable[[Tensor, Tensor], Tensor]
Batching = Literal["vmap", "loop", "grouped"]


class NonFiniteLossError(FloatingPointError):
    """A meta-batch's query loss is NaN or infinite (a diverged inner loop or outer step);
    ``losses`` holds every task's (detached)."""

    def __init__(self, message: str, losses: Tensor) -> None:
        super().__init__(message)
        self.losses = losses


class TaskBatch(NamedTuple):
    """A meta-batch: every tensor has the task index as its leading dimension."""

    x_support: Tensor
    y_support: Tensor
    x_query: Tensor
    y_query: Tensor

    @property
    def num_tasks(self) -> int:
        return self.x_support.shape[0]

    def task(self, index: int) -> "TaskBatch":
        """Task ``index`` alone, as a ``TaskBatch`` whose four tensors have no task dimension
        (support inputs (examples, ...), support targets, query inputs, query targets), views of
        this batch's tensors, not copies: e.g. ``maml.adapt(*batch.task(i)[:2])`` in a loop."""
        return TaskBatch(*(t[index] for t in self))

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> "TaskBatch":
        """The same tasks on ``device``, as ``nn.Module.to``: ``dtype`` casts the floating-point
        tensors (inputs, regression targets) and leaves class labels as they are."""

        def moved(t: Tensor) -> Tensor:
            cast = dtype is not None and t.is_floating_point()
            return t.to(device=device, dtype=dtype if cast else t.dtype)

        return TaskBatch(*map(moved, self))


class EpisodicLearner(nn.Module):
    """Base class: ``model`` is the network, ``batching`` how a meta-batch runs."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, batching: Batching) -> None:
        super().__init__()
        for name, module in model.named_modules():
            if isinstance(module, _BatchNorm) and module.track_running_stats:
                raise ValueError(
                    f"{name} ({module}) tracks running statistics; a meta-model's BatchNorm must "
                    "use track_running_stats=False (or msr.TaskBatchNorm)"
                )
        self.model = model
        self.loss_fn = loss_fn
        self.batching = batching

    @property
    def batching(self) -> Batching:
        """How a meta-batch runs: ``"vmap"`` (one batched computation), ``"loop"`` (per task) or
        ``"grouped"`` (tasks folded into the channels, plain autograd: ``msr.grouped``)."""
        return self._batching

    @batching.setter
    def batching(self, value: Batching) -> None:
        if value not in ("vmap", "loop", "grouped"):
            raise ValueError(f"batching must be 'vmap', 'loop' or 'grouped', got {value!r}")
        if value == "grouped":
            check_groupable(self.model)
        if value == "vmap":
            check_no_torch_batchnorm(self.model, "batching='loop'")
        self._batching = value

    def forward(self, x: Tensor, params: Mapping[str, Tensor] | None = None) -> Tensor:
        """The model on ``x``: unadapted (the meta-learned initialization), or with the tensors
        ``params`` (e.g. those ``MAML.adapt`` returns) in place of its own."""
        return self.model(x) if params is None else functional_call(self.model, params, (x,))

    def _model_state(self, detach: bool) -> dict[str, Tensor]:
        state = {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}
        return {n: t.detach() for n, t in state.items()} if detach else state

    def _state(self, detach: bool) -> Any:
        """Every tensor the per-task function reads (a pytree); detached for scoring."""
        raise NotImplementedError

    def _check(self, tasks: TaskBatch) -> None:
        """Refuse tasks this learner cannot score (beyond ``check_tasks``); nothing by default."""

    def _checked(self, tasks: TaskBatch | tuple[Tensor, ...]) -> TaskBatch:
        tasks = check_tasks(tasks)
        self._check(tasks)
        return tasks

    def _query(
        self,
        state: Any,
        x_support: Tensor,
        y_support: Tensor,
        x_query: Tensor,
        y_query: Tensor,
        metrics: Mapping[str, LossFn],
        in_vmap: bool,
    ) -> dict[str, Tensor]:
        """One task's query ``"loss"`` and extra metrics; pure in ``state`` and the task.

        ``in_vmap`` says whether it runs inside ``vmap`` (where only ``torch.func`` transforms
        apply) or alone (where plain autograd is cheaper).
        """
        raise NotImplementedError

    def _grouped(
        self, tasks: TaskBatch, metrics: Mapping[str, LossFn], detach: bool
    ) -> dict[str, Tensor]:
        """Every task's query ``"loss"`` and metrics as one grouped computation (``msr.grouped``);
        differentiable through the inner loop unless ``detach``."""
        raise NotImplementedError(f"{type(self).__name__} has no grouped path")

    def _scores_per_task(
        self, prediction: Tensor, target: Tensor, metrics: Mapping[str, LossFn]
    ) -> dict[str, Tensor]:
        """``_scores`` of each task of (tasks, ...) predictions and targets."""
        return vmap(functools.partial(self._scores, metrics=metrics))(prediction, target)

    def _scores(
        self, prediction: Tensor, target: Tensor, metrics: Mapping[str, LossFn]
    ) -> dict[str, Tensor]:
        """The training ``"loss"`` and each extra metric of one task's query predictions."""
        out = {"loss": self._loss(prediction, target, "query")}
        out.update({name: fn(prediction, target) for name, fn in metrics.items()})
        return out

    def _loss(self, prediction: Tensor, target: Tensor, part: str) -> Tensor:
        """``loss_fn`` on one task's ``part`` ("support" or "query") set. Real-valued targets
        must have the predictions' shape: a loss such as ``mse_loss`` would broadcast (N,)
        targets against (N, 1) predictions into an (N, N) comparison without an error."""
        if target.is_floating_point() and target.shape != prediction.shape:
            raise ValueError(
                f"{part} targets of shape {tuple(target.shape)} for predictions of shape "
                f"{tuple(prediction.shape)} (per task): the loss would broadcast them; give "
                "the targets the predictions' shape"
            )
        return self._loss_function(part)(prediction, target)

    def _loss_function(self, part: str) -> LossFn:
        """The loss of a ``part`` ("support" or "query") set: ``loss_fn`` for both by default."""
        return self.loss_fn

    def _run(
        self, tasks: TaskBatch, detach: bool, metrics: Mapping[str, LossFn], chunk_size: int | None
    ) -> dict[str, Tensor]:
        query = functools.partial(self._query, metrics=metrics, in_vmap=True)
        # randomness="different": dropout (or any random op) draws its own mask per task
        per_task = vmap(
            query, in_dims=(None, 0, 0, 0, 0), chunk_size=chunk_size, randomness="different"
        )
        return per_task(self._state(detach), *tasks)

    def meta_loss(self, tasks: TaskBatch) -> Tensor:
        """The mean query loss over the meta-batch, differentiable through the inner loop.

        Call ``.backward()`` on it yourself, e.g. after adding a regularizer or through a
        ``GradScaler``. It holds every task's graph until then; on the ``"loop"`` path
        ``meta_backward`` saves that memory by backpropagating after each task.
        """
        losses = self._task_losses(self._checked(tasks))
        return _finite(losses, "nothing was backpropagated").mean()

    def _task_losses(self, tasks: TaskBatch) -> Tensor:
        if self.batching == "grouped":
            return self._grouped(tasks, {}, detach=False)["loss"]
        if self.batching == "vmap":
            return self._run(tasks, detach=False, metrics={}, chunk_size=None)["loss"]
        state = self._state(detach=False)
        return torch.stack(
            [
                self._query(state, *tasks.task(i), {}, in_vmap=False)["loss"]
                for i in range(tasks.num_tasks)
            ]
        )

    def meta_backward(self, tasks: TaskBatch) -> Tensor:
        """Accumulate the meta-gradient of the mean query loss into ``.grad``; return task losses.

        Call ``optimizer.zero_grad()`` before and ``optimizer.step()`` after, as usual. The same
        gradient as ``meta_loss(tasks).backward()``; on the ``"loop"`` path each task's graph is
        freed as soon as its share of the gradient is accumulated. A NaN or infinite task loss
        is a ``NonFiniteLossError`` naming the tasks.
        """
        tasks = self._checked(tasks)
        if self.batching != "loop":
            losses = _finite(self._task_losses(tasks), "no gradient was accumulated")
            losses.mean().backward()
            return losses.detach()
        losses = []
        for index in range(tasks.num_tasks):
            state = self._state(detach=False)
            loss = self._query(state, *tasks.task(index), {}, in_vmap=False)["loss"]
            (loss / tasks.num_tasks).backward()
            losses.append(loss.detach())
        return _finite(torch.stack(losses), ".grad holds it: zero it before the next step")

    def evaluate(
        self,
        tasks: TaskBatch,
        metrics: Mapping[str, LossFn] | None = None,
        chunk_size: int | None = 64,
    ) -> dict[str, Tensor]:
        """Score each task's query set after its support set; no meta-gradient is kept.

        Returns per-task tensors: ``"loss"`` and one entry per extra metric ``fn(pred, target)``
        (metrics must be written with vmap-able torch ops, e.g. accuracy via ``argmax``). A NaN
        or infinite task loss (non-finite inputs, or a diverged adaptation) is a
        ``NonFiniteLossError`` naming the tasks, as in ``meta_backward``.
        """
        tasks = self._checked(tasks)
        metrics = dict(metrics or {})
        if "loss" in metrics:
            raise ValueError("metric name 'loss' is reserved for the training loss")
        scores = self._evaluate(tasks, metrics, chunk_size)
        _finite(scores["loss"], "no score is given (a metric of NaN outputs would mislead)")
        return scores

    def _evaluate(
        self, tasks: TaskBatch, metrics: dict[str, LossFn], chunk_size: int | None
    ) -> dict[str, Tensor]:
        if self.batching == "vmap":
            with torch.no_grad():
                return self._run(tasks, detach=True, metrics=metrics, chunk_size=chunk_size)
        if self.batching == "grouped":
            step = chunk_size or tasks.num_tasks
            with torch.no_grad():
                chunks = [
                    self._grouped(TaskBatch(*(t[i : i + step] for t in tasks)), metrics, True)
                    for i in range(0, tasks.num_tasks, step)
                ]
            return {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
        state = self._state(detach=True)
        rows = []
        for index in range(tasks.num_tasks):  # no graph outlives its task: memory flat in tasks
            with torch.no_grad():
                row = self._query(state, *tasks.task(index), metrics, in_vmap=False)
            rows.append({k: v.detach() for k, v in row.items()})
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def check_no_torch_batchnorm(model: nn.Module, instead: str) -> None:
    """Refuse a torch BatchNorm in a model that runs under ``vmap``: its second-order gradients
    are wrong there (torch 2.13); ``instead`` says what to use."""
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            raise ValueError(
                f"{name} is a torch BatchNorm, whose second-order gradients are wrong under vmap "
                f"in torch 2.13; use msr.TaskBatchNorm or {instead}"
            )


def accuracy(logits: Tensor, target: Tensor) -> Tensor:
    """Share of correct argmax predictions (a vmap-able metric for ``evaluate``)."""
    return (logits.argmax(-1) == target).to(logits.dtype).mean()


def _finite(losses: Tensor, consequence: str) -> Tensor:
    """``losses`` (one per task), or a ``NonFiniteLossError`` naming the tasks whose loss is
    NaN or infinite, and its ``consequence``."""
    bad = (~torch.isfinite(losses.detach())).nonzero().flatten().tolist()
    if bad:
        shown = ", ".join(f"{i} ({losses[i].item()})" for i in bad[:5])
        raise NonFiniteLossError(
            f"the query loss is not finite: task {shown}{', ...' if len(bad) > 5 else ''} of "
            f"{losses.numel()} (a diverged inner loop or outer step); {consequence}",
            losses.detach(),
        )
    return losses


def check_tasks(tasks: TaskBatch | tuple[Tensor, ...]) -> TaskBatch:
    """A ``TaskBatch`` of (tasks, examples, ...) inputs and (tasks, examples, ...) targets: the
    four tensors share one non-empty leading task dimension, each set's inputs and targets
    have as many examples, and support and query inputs (and targets) have one shape per
    example. A batch without a task dimension (e.g. one task's (examples, features) inputs)
    is refused rather than read as many one-example tasks."""
    if len(tasks) != 4:
        raise ValueError(
            f"tasks must be (x_support, y_support, x_query, y_query), got {len(tasks)} tensors"
        )
    tasks = TaskBatch(*tasks)
    x_support, y_support, x_query, y_query = tasks
    if min(x_support.dim(), x_query.dim()) < 3 or min(y_support.dim(), y_query.dim()) < 2:
        raise ValueError(
            f"task inputs {tuple(x_support.shape)} and targets {tuple(y_support.shape)} need "
            "(tasks, examples, ...) dimensions: for one task, add a leading task dimension "
            "(x[None]) rather than pass its examples as tasks"
        )
    sizes = [t.shape[0] for t in tasks]
    if sizes[0] < 1 or len(set(sizes)) != 1:
        raise ValueError(f"all task tensors need the same leading task dimension, got {sizes}")
    for part, x, y in (("support", x_support, y_support), ("query", x_query, y_query)):
        if x.shape[1] != y.shape[1]:
            raise ValueError(
                f"{part} inputs {tuple(x.shape)} and targets {tuple(y.shape)} differ in their "
                "number of examples (dimension 1)"
            )
    if x_support.shape[2:] != x_query.shape[2:] or y_support.shape[2:] != y_query.shape[2:]:
        raise ValueError(
            f"support and query examples differ in shape: inputs {tuple(x_support.shape[2:])} vs "
            f"{tuple(x_query.shape[2:])}, targets {tuple(y_support.shape[2:])} vs "
            f"{tuple(y_query.shape[2:])}"
        )
    return tasks
