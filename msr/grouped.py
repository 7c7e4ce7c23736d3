"""A meta-batch as one computation: every task's activations folded into the channels.

``batching="grouped"`` runs a model on all T tasks of a meta-batch at once with plain autograd,
no ``vmap``: a conv layer with one kernel per task becomes one grouped convolution
(``groups=T``) over inputs of shape ``(N, T * C, H, W)``, a task-statistics BatchNorm becomes
one ``batch_norm`` over the T * C channels (each channel holds one task's statistics), a linear
layer one batched product. The inner loop's gradient of the summed task losses with respect to
the stacked per-task fast parameters is each task's own gradient, since tasks do not interact.
On the CPU the activations are kept channels-last, where the convolutions and max-pools of
small few-shot nets run fastest (``benchmarks/few_shot_step.py``).

Supported: ``nn.Sequential`` models (nested too) of ``MSRConv2d``, ``MSRLinear``, ``nn.Conv2d``,
``nn.Linear``, ``TaskBatchNorm``, BatchNorm without running statistics, ``nn.Flatten`` and
channel-wise activations and pools (``GROUPABLE``); every task needs the same support (and
query) size. ``check_groupable`` names the first module outside that set.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from msr.layers import MSRConv2d, MSRLinear
from msr.norm import TaskBatchNorm

CHANNELWISE = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Identity,
    nn.MaxPool2d,
    nn.AvgPool2d,
)
GROUPABLE = (MSRConv2d, MSRLinear, nn.Conv2d, nn.Linear, TaskBatchNorm, _BatchNorm, nn.Flatten)
GROUPABLE += CHANNELWISE


def check_groupable(model: nn.Module) -> None:
    """Raise ``ValueError`` naming the first module that ``grouped_call`` cannot run."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            continue
        label = name or "the model"
        if not isinstance(module, GROUPABLE):
            raise ValueError(
                f"batching='grouped' runs nn.Sequential models of {_names(GROUPABLE)}; {label} "
                f"is a {type(module).__name__}: use batching='loop' or 'vmap'"
            )
        if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
            raise ValueError(f"batching='grouped' needs {label} with groups=1 and zero padding")
        if isinstance(module, nn.Flatten) and (module.start_dim, module.end_dim) != (1, -1):
            raise ValueError(f"batching='grouped' needs {label} to flatten dims 1..-1")


def grouped_call(
    model: nn.Module, tensors: Mapping[str, Tensor], per_task: Collection[str], x: Tensor
) -> Tensor:
    """``model`` on every task at once: ``x`` is (T, N, C, H, W) images or (T, N, F) rows, the
    result (T, N, ...) each task's output. ``tensors`` holds every parameter and buffer of the
    model by name (as ``functional_call`` takes them); those named in ``per_task`` carry a
    leading task dimension of size T (e.g. adapted fast weights), the others are shared."""
    if x.dim() not in (3, 5):
        raise ValueError(f"grouped inputs are (tasks, N, C, H, W) or (tasks, N, F), got {x.shape}")
    tasks, count = x.shape[:2]
    run = _Run(tensors, set(per_task), tasks)
    if x.dim() == 5:  # fold the tasks into the channels
        folded = x.transpose(0, 1).reshape(count, tasks * x.shape[2], *x.shape[3:])
        out, is_folded = run.module(model, "", folded.contiguous(memory_format=_layout(x)), True)
    else:
        out, is_folded = run.module(model, "", x, False)
    if is_folded:
        return out.reshape(count, tasks, -1, *out.shape[2:]).transpose(0, 1)
    return out


class _Run:
    """One grouped pass: the tensors by name, which of them are per task, the task count."""

    def __init__(self, tensors: Mapping[str, Tensor], per_task: set[str], tasks: int) -> None:
        self.tensors, self.per_task, self.tasks = tensors, per_task, tasks

    def get(self, name: str) -> Tensor | None:
        """The tensor ``name`` with a leading task dimension (shared ones expanded)."""
        tensor = self.tensors.get(name)
        if tensor is None or name in self.per_task:
            return tensor
        return tensor.expand(self.tasks, *tensor.shape)

    def module(
        self, module: nn.Module, prefix: str, h: Tensor, folded: bool
    ) -> tuple[Tensor, bool]:
        """``module`` on the activations ``h``: folded (N, T * C, ...) or rows (T, N, F)."""
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            skip = False
            for index, (name, child) in enumerate(children):
                if skip:
                    skip = False
                    continue
                after = children[index + 1][1] if index + 1 < len(children) else None
                if folded and isinstance(child, nn.ReLU) and isinstance(after, nn.MaxPool2d):
                    # max-pool first: the same values and gradients, a quarter of the ReLU's work
                    h, skip = torch.relu(after(h)), True
                    continue
                h, folded = self.module(child, f"{prefix}{name}.", h, folded)
            return h, folded
        if isinstance(module, MSRConv2d | nn.Conv2d | MSRLinear | nn.Linear):
            return self.weighted(module, prefix, h, folded), folded
        if isinstance(module, TaskBatchNorm | _BatchNorm):
            return self.normalized(module, prefix, h, folded), folded
        if isinstance(module, nn.Flatten):
            if not folded:
                return h, False
            return h.reshape(h.shape[0], self.tasks, -1).transpose(0, 1), False
        if isinstance(module, CHANNELWISE):
            if not folded and isinstance(module, nn.MaxPool2d | nn.AvgPool2d):
                raise ValueError(f"{prefix[:-1]}: a 2-D pool after the features were flattened")
            return module(h), folded
        raise ValueError(f"{prefix[:-1]} ({type(module).__name__}) cannot run grouped")

    def weighted(self, module: nn.Module, prefix: str, h: Tensor, folded: bool) -> Tensor:
        if isinstance(module, MSRConv2d | MSRLinear):  # the layer's own formula, per task
            names = [n for n, _ in module.named_parameters(recurse=False)]
            names += [n for n, _ in module.named_buffers(recurse=False)]
            if any(prefix + n in self.per_task for n in names if n.startswith("U")):
                raise ValueError(f"{prefix[:-1]}: a per-task U cannot run grouped (U is meta)")
            weight = module.weight_from({n: self.tensors[prefix + n] for n in names})
            if prefix + "v" not in self.per_task:
                weight = weight.expand(self.tasks, *weight.shape)
        else:
            weight = self.get(prefix + "weight")
        bias = self.get(prefix + "bias")
        if isinstance(module, MSRConv2d | nn.Conv2d):
            if not folded:
                raise ValueError(f"{prefix[:-1]}: a convolution after the features were flattened")
            return F.conv2d(
                h,
                weight.reshape(-1, *weight.shape[2:]),
                None if bias is None else bias.reshape(-1),
                module.stride,
                module.padding,
                module.dilation,
                groups=self.tasks,
            )
        if folded:
            raise ValueError(f"{prefix[:-1]}: a linear layer needs flattened features first")
        out = torch.bmm(h, weight.transpose(1, 2))
        return out if bias is None else out + bias.unsqueeze(1)

    def normalized(self, module: nn.Module, prefix: str, h: Tensor, folded: bool) -> Tensor:
        """Task statistics: each folded channel is one task's channel."""
        weight, bias = self.get(prefix + "weight"), self.get(prefix + "bias")
        flat = [None if t is None else t.reshape(-1) for t in (weight, bias)]
        if folded:
            return F.batch_norm(h, None, None, *flat, training=True, eps=module.eps)
        rows = h.transpose(0, 1).reshape(h.shape[1], -1)  # (N, T * F)
        out = F.batch_norm(rows, None, None, *flat, training=True, eps=module.eps)
        return out.reshape(h.shape[1], self.tasks, -1).transpose(0, 1)


def _layout(x: Tensor) -> torch.memory_format:
    return torch.contiguous_format if x.is_cuda else torch.channels_last


def _names(types: tuple[type, ...]) -> str:
    return ", ".join(sorted({t.__name__.lstrip("_") for t in types}))
