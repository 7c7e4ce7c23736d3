"""Functional MAML on ``torch.func``: adapt only the fast parameters, meta-learn everything else.

The inner loop is a pure function of (parameters, inner learning rates, one task), so a meta-batch
runs either as one ``vmap``-ed computation (``batching="vmap"``, fast for small models) or as a
loop that backpropagates after each task (``batching="loop"``, for wide/conv nets or tight memory).
Both give the same meta-gradient.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._C import _functorch
from torch.func import functional_call, grad, vmap

from msr.episodic import (
    Batching,
    EpisodicLearner,
    LossFn,
    TaskBatch,
    check_no_torch_batchnorm,
)
from msr.grouped import grouped_call
from msr.layers import SymmetryLayer

# An inner step of your own: (fast parameters, their support-loss gradients, step) -> new ones.
InnerUpdate = Callable[[dict[str, Tensor], Mapping[str, Tensor], int], Mapping[str, Tensor]]


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


class MAML(EpisodicLearner):
    """Model-agnostic meta-learning over a model's fast parameters.

    ``maml.parameters()`` are the outer-loop variables: the model's parameters (symmetries and
    the initial fast parameters) and, when ``learn_inner_lr``, one inner learning rate per fast
    parameter tensor (``per_step_inner_lr``: one per tensor and inner step, as in MAML++),
    stored through a sharp softplus (``raw_inner_lrs``: lr = softplus(beta raw) / beta, with
    beta = 10 / ``inner_lr``), so they stay positive by construction while an lr above a tenth
    of its initial value moves as a plain parameter would; ``inner_lrs`` gives their values.
    ``inner_update(params, grads, step) -> params`` replaces SGD with a rule of your own (an
    ``nn.Module`` one is meta-learned with the rest; on the grouped path the tensors carry a
    leading task dimension). Second-order meta-gradients by default; ``first_order=True``
    drops the second-order terms. ``fast_parameters`` restricts adaptation to the named
    parameters (e.g. only the head, for ANIL). ``inner_loss_fn`` is the support-set loss the
    inner loop descends (default: ``loss_fn``, the query loss), e.g. a label-smoothed or
    regularized one.

    Beyond ``meta_backward``, the inner loop is open: ``adapt(x, y, create_graph=True)`` gives
    one task's adapted tensors, and ``maml(x_query, params=...)`` runs the model with them, so
    a user's own outer objective backpropagates through the adaptation.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn = F.mse_loss,
        *,
        inner_loss_fn: LossFn | None = None,
        inner_steps: int = 1,
        inner_lr: float = 0.1,
        learn_inner_lr: bool = True,
        per_step_inner_lr: bool = False,
        inner_update: InnerUpdate | None = None,
        first_order: bool = False,
        fast_parameters: Iterable[str] | None = None,
        batching: Batching = "vmap",
        test_inner_steps: int | None = None,
    ) -> None:
        _check_steps(inner_steps)
        if test_inner_steps is not None:
            _check_steps(test_inner_steps)
        if isinstance(inner_lr, bool) or not (
            isinstance(inner_lr, int | float) and math.isfinite(inner_lr) and inner_lr > 0
        ):
            raise ValueError(f"inner_lr must be a positive finite number, got {inner_lr!r}")
        if inner_update is not None and not callable(inner_update):
            raise TypeError(f"inner_update must be callable, got {type(inner_update).__name__}")
        if inner_update is not None and per_step_inner_lr:
            raise ValueError("per_step_inner_lr sets SGD's lrs; an inner_update has its own rule")
        super().__init__(model, loss_fn, batching)
        self.inner_loss_fn = loss_fn if inner_loss_fn is None else inner_loss_fn
        self.inner_steps = inner_steps
        self.first_order = first_order
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
        keys: dict[str, str] = {}
        for name in fast:  # ParameterDict keys cannot hold "."; two names must not share one
            if (other := keys.setdefault(_lr_key(name), name)) != name:
                raise ValueError(
                    f"parameters {other!r} and {name!r} would share the inner learning rate "
                    f"{_lr_key(name)!r}; rename one of them"
                )
        self.fast_names: tuple[str, ...] = tuple(fast)
        self.per_step_inner_lr = per_step_inner_lr
        self.trained_inner_steps = inner_steps  # how many per-step lrs there are
        # what evaluate / adapt / adapted_model take by default (None: the training's), e.g.
        # the count chosen on validation tasks; the drivers' model files carry it
        self.test_inner_steps = test_inner_steps
        self.inner_update = inner_update
        first = model.get_parameter(fast[0])  # the inner lrs live beside the fast parameters
        shape = (inner_steps,) if per_step_inner_lr else ()
        options = {"dtype": first.dtype, "device": first.device}
        self.register_buffer("inner_lr_beta", torch.tensor(_SHARPNESS / inner_lr, **options))
        raw = torch.full(shape, inner_lr, **options)
        raw = torch.log(torch.expm1(self.inner_lr_beta * raw)) / self.inner_lr_beta
        self.raw_inner_lrs = nn.ParameterDict(
            {} if inner_update else {_lr_key(n): nn.Parameter(raw.clone()) for n in fast}
        )
        self.raw_inner_lrs.requires_grad_(learn_inner_lr)

    def _lr(self, raw: Tensor) -> Tensor:
        """An inner lr from its raw parameter: softplus(beta raw) / beta, positive (it decays
        smoothly to 0 as raw goes to -inf, never below) and ~raw once raw is well above 1/beta."""
        return F.softplus(self.inner_lr_beta * raw) / self.inner_lr_beta

    @property
    def inner_lrs(self) -> dict[str, Tensor]:
        """The inner learning rates, positive by construction (from ``raw_inner_lrs``), by
        ``raw_inner_lrs``' keys (a fast parameter's name with "__" for "."): a scalar per
        tensor, or one per inner step with ``per_step_inner_lr``; differentiable."""
        return {key: self._lr(raw) for key, raw in self.raw_inner_lrs.items()}

    def _loss_function(self, part: str) -> LossFn:
        return self.inner_loss_fn if part == "support" else self.loss_fn

    # --- the pure per-task computation -------------------------------------------------------
    def _state(self, detach: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The model's tensors and the inner lrs of the fast parameters that adapt now: a fast
        parameter the user has since frozen (``requires_grad=False``) stays as it is."""
        live = [n for n in self.fast_names if self.model.get_parameter(n).requires_grad]
        if not live:
            raise ValueError(
                f"every fast parameter {list(self.fast_names)} is frozen (requires_grad=False): "
                "the inner loop has nothing to adapt"
            )
        lrs: dict[str, Tensor | None] = {n: None for n in live}  # None: inner_update's own
        if self.inner_update is None:
            lrs = {n: self._lr(self.raw_inner_lrs[_lr_key(n)]) for n in live}
            if detach:
                lrs = {n: t.detach() for n, t in lrs.items()}
        return self._model_state(detach), lrs

    def _update(
        self,
        fast: dict[str, Tensor],
        grads: Mapping[str, Tensor],
        lrs: Mapping[str, Tensor | None],
        step: int,
    ) -> dict[str, Tensor]:
        """One inner step: ``inner_update``, or SGD with the (per-step) inner lrs."""
        if self.inner_update is not None:
            return _checked_update(self.inner_update(fast, grads, step), fast)
        index = step if self.per_step_inner_lr else ...
        return {n: fast[n] - lrs[n][index] * grads[n] for n in fast}

    def _adapt(
        self,
        state: Mapping[str, Tensor],
        lrs: Mapping[str, Tensor],
        x: Tensor,
        y: Tensor,
        in_vmap: bool,
    ) -> dict[str, Tensor]:
        """SGD on the fast parameters (those with an lr in ``lrs``); ``torch.func.grad`` inside
        vmap, plain autograd outside (the same gradients, measured 2-3x cheaper per task for
        small models). Outside vmap with gradients disabled (scoring), the inner loop keeps no
        graph beyond each step."""
        fast = {n: state[n] for n in lrs}
        rest = {n: t for n, t in state.items() if n not in fast}

        def support_loss(fast_params: dict[str, Tensor]) -> Tensor:
            prediction = functional_call(self.model, {**rest, **fast_params}, (x,))
            return self._loss(prediction, y, "support")

        create_graph = not self.first_order and torch.is_grad_enabled()
        for step in range(self.inner_steps):
            if in_vmap:
                grads = grad(support_loss)(fast)
                if self.first_order:
                    grads = {n: g.detach() for n, g in grads.items()}
            else:
                fast = _differentiable(fast)
                with torch.enable_grad():
                    values = torch.autograd.grad(
                        support_loss(fast), list(fast.values()), create_graph=create_graph
                    )
                grads = dict(zip(fast, values, strict=True))
            fast = self._update(fast, grads, lrs, step)
        return {**rest, **fast}

    def _query(
        self,
        state: tuple[dict[str, Tensor], dict[str, Tensor]],
        x_support: Tensor,
        y_support: Tensor,
        x_query: Tensor,
        y_query: Tensor,
        metrics: Mapping[str, LossFn],
        in_vmap: bool,
    ) -> dict[str, Tensor]:
        adapted = self._adapt(*state, x_support, y_support, in_vmap)
        prediction = functional_call(self.model, adapted, (x_query,))
        return self._scores(prediction, y_query, metrics)

    def _grouped(
        self, tasks: TaskBatch, metrics: Mapping[str, LossFn], detach: bool
    ) -> dict[str, Tensor]:
        """The inner loop of every task at once (``msr.grouped``): the fast parameters get a
        leading task dimension, and the gradient of the summed support losses is each task's."""
        state, lrs = self._state(detach)
        count = tasks.num_tasks
        fast = {n: state[n].expand(count, *state[n].shape) for n in lrs}
        rest = {n: t for n, t in state.items() if n not in fast}

        def forward(fast_params: dict[str, Tensor], x: Tensor) -> Tensor:
            return grouped_call(self.model, {**rest, **fast_params}, fast_params.keys(), x)

        create_graph = not self.first_order and torch.is_grad_enabled()
        for step in range(self.inner_steps):
            fast = _differentiable(fast)
            with torch.enable_grad():
                prediction = forward(fast, tasks.x_support)
                losses = vmap(functools.partial(self._loss, part="support"))(
                    prediction, tasks.y_support
                )
                values = torch.autograd.grad(
                    losses.sum(), list(fast.values()), create_graph=create_graph
                )
            fast = self._update(fast, dict(zip(fast, values, strict=True)), lrs, step)
        return self._scores_per_task(forward(fast, tasks.x_query), tasks.y_query, metrics)

    def inner_curvature(
        self, x_support: Tensor, y_support: Tensor, iterations: int = 100, scaled: bool = True
    ) -> tuple[float, float]:
        """How hard one task's inner problem is for the learned step: the (smallest, largest)
        eigenvalues of D^1/2 H D^1/2, with H the Hessian of the support loss in the fast
        parameters at their meta-learned initialization and D the learned per-tensor inner
        lrs (power iteration on Hessian-vector products from a fixed start, then again shifted
        by the first eigenvalue found, for the other end of the spectrum). One gradient step with
        these lrs is stable along every direction when the largest is below 2; negative ones are
        directions of negative curvature. For an MSR layer H is taken in v, so U shapes it.
        With ``per_step_inner_lr`` D holds the first step's lrs (the step taken at the
        initialization); ``scaled=False`` gives the ends of H's own spectrum instead (the only
        choice with an ``inner_update`` of your own, which has no lrs)."""
        state, lrs = self._state(detach=True)
        fast = _differentiable({n: state[n] for n in lrs})
        rest = {n: t for n, t in state.items() if n not in fast}
        if scaled and self.inner_update is not None:
            raise ValueError("an inner_update of your own has no lrs to scale by: scaled=False")
        first = 0 if self.per_step_inner_lr else ...
        scales = [lrs[n][first].sqrt() if scaled else 1.0 for n in fast]
        with torch.enable_grad():
            prediction = functional_call(self.model, {**rest, **fast}, (x_support,))
            grads = torch.autograd.grad(
                self._loss(prediction, y_support, "support"), list(fast.values()), create_graph=True
            )

            def product(vector: list[Tensor]) -> list[Tensor]:  # D^1/2 H D^1/2 vector
                scaled = [s * v for s, v in zip(scales, vector, strict=True)]
                image = torch.autograd.grad(grads, list(fast.values()), scaled, retain_graph=True)
                return [s * h for s, h in zip(scales, image, strict=True)]

            first = _power_iteration(product, list(fast.values()), iterations, shift=0.0)
            other = _power_iteration(product, list(fast.values()), iterations, shift=first)
        return min(first, other), max(first, other)

    @contextmanager
    def _steps(self, inner_steps: int | None) -> Iterator[None]:
        """Inside, the inner loop takes ``inner_steps`` steps (None: ``test_inner_steps``, if
        set, else the training's)."""
        if inner_steps is None:
            inner_steps = self.test_inner_steps
        if inner_steps is None:
            yield
            return
        if self.per_step_inner_lr and _check_steps(inner_steps) > self.trained_inner_steps:
            raise ValueError(
                f"per-step inner lrs were learned for {self.trained_inner_steps} steps, so the "
                f"inner loop cannot take {inner_steps} (per_step_inner_lr=False learns one lr "
                "for any number of steps)"
            )
        trained, self.inner_steps = self.inner_steps, _check_steps(inner_steps)
        try:
            yield
        finally:
            self.inner_steps = trained

    # --- public API --------------------------------------------------------------------------
    def evaluate(
        self,
        tasks: TaskBatch,
        metrics: Mapping[str, LossFn] | None = None,
        chunk_size: int | None = 64,
        *,
        inner_steps: int | None = None,
    ) -> dict[str, Tensor]:
        """``EpisodicLearner.evaluate``, adapting each task for ``inner_steps`` SGD steps
        (default: ``test_inner_steps`` if set, else ``inner_steps``, the training's). The
        standard few-shot protocol adapts longer at test time than in training; choose the
        count on validation tasks (and keep it as ``test_inner_steps``)."""
        with self._steps(inner_steps):
            return super().evaluate(tasks, metrics, chunk_size)

    def adapt(
        self,
        x_support: Tensor,
        y_support: Tensor,
        *,
        inner_steps: int | None = None,
        create_graph: bool = False,
    ) -> dict[str, Tensor]:
        """The model's tensors (parameters and buffers, by name) adapted to one task's support
        set in ``inner_steps`` steps (default: ``test_inner_steps`` or the training's), for
        ``self(x, params=...)`` or ``torch.func.functional_call``.

        With ``create_graph=True`` they are differentiable in the symmetries, the initial fast
        parameters and the inner lrs (second order unless ``first_order``), so that a user's
        own query loss backpropagates through the adaptation; otherwise they are detached.
        Works alone or inside ``torch.func.vmap`` over tasks (give it ``randomness="different"``
        if the model has dropout).
        """
        in_vmap = any(_functorch.is_batchedtensor(t) for t in (x_support, y_support))
        if in_vmap:  # your own vmap: the check MAML's batching='vmap' makes
            check_no_torch_batchnorm(self.model, "adapt each task outside vmap")
        state, lrs = self._state(detach=not create_graph)
        with self._steps(inner_steps), torch.set_grad_enabled(create_graph):
            adapted = self._adapt(state, lrs, x_support, y_support, in_vmap)
        return adapted if create_graph else {n: t.detach() for n, t in adapted.items()}

    def adapted_model(
        self, x_support: Tensor, y_support: Tensor, *, inner_steps: int | None = None
    ) -> nn.Module:
        """A detached copy of the model adapted to one task's support set, for inspection (e.g.
        its layers' weights), in ``inner_steps`` steps (default: as ``adapt``)."""
        adapted = self.adapt(x_support, y_support, inner_steps=inner_steps)
        clone = copy.deepcopy(self.model)
        for name, tensor in adapted.items():
            if name in self.fast_names:
                _assign(clone, name, tensor)
        return clone


def _power_iteration(
    product: Callable[[list[Tensor]], list[Tensor]],
    like: list[Tensor],
    iterations: int,
    shift: float,
) -> float:
    """The eigenvalue of largest magnitude of the symmetric map v -> product(v) - shift * v,
    plus ``shift`` (so with ``shift`` at one end of the spectrum it finds the other end)."""
    generator = torch.Generator(device=like[0].device).manual_seed(0)
    vector = [torch.randn(t.shape, generator=generator, device=t.device) for t in like]
    value = 0.0
    for _ in range(iterations):
        norm = torch.sqrt(sum(v.pow(2).sum() for v in vector))
        vector = [v / norm for v in vector]
        image = [u - shift * v for u, v in zip(product(vector), vector, strict=True)]
        value = float(sum((v * u).sum() for v, u in zip(vector, image, strict=True)))
        vector = [u.detach() for u in image]
    return value + shift


def _checked_update(updated: Mapping[str, Tensor], fast: dict[str, Tensor]) -> dict[str, Tensor]:
    """An ``inner_update``'s result, refused (``ValueError``) unless it gives every fast
    parameter, and only those, a tensor of its shape (a wrong shape would broadcast, a missing
    name silently stop adapting)."""
    if not isinstance(updated, Mapping) or set(updated) != set(fast):
        names = sorted(updated) if isinstance(updated, Mapping) else type(updated).__name__
        raise ValueError(
            f"inner_update must return a tensor for each fast parameter {sorted(fast)}, got {names}"
        )
    for name, tensor in updated.items():
        if not isinstance(tensor, Tensor) or tensor.shape != fast[name].shape:
            shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise ValueError(
                f"inner_update returned {shape} for {name}, whose shape is "
                f"{tuple(fast[name].shape)}"
            )
    return dict(updated)


def _differentiable(fast: dict[str, Tensor]) -> dict[str, Tensor]:
    """A detached (scoring) state still needs gradients for the inner loop itself: leaf copies,
    never the model's own parameters (their flags stay the user's)."""
    return {n: t if t.requires_grad else t.detach().requires_grad_() for n, t in fast.items()}


def _check_steps(inner_steps: object) -> int:
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 0:
        raise ValueError(f"inner_steps must be a non-negative integer, got {inner_steps!r}")
    return inner_steps


_SHARPNESS = 10.0  # beta times the initial lr: softplus's slope there is sigmoid(10) = 0.99995


def _lr_key(name: str) -> str:
    return name.replace(".", "__")


def _assign(module: nn.Module, name: str, value: Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    with torch.no_grad():
        getattr(owner, leaf).copy_(value)
