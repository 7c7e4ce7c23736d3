"""Model files that describe themselves: ``save`` a model or learner, ``load`` rebuilds it.

A model file holds the architecture as data (``architecture``: module types and constructor
arguments, JSON-like, no pickled code), the state dict and any metadata you add, with a
SHA-256 of it all verified on load; it loads with ``torch.load(weights_only=True)``, so opening
a file someone shared runs no code of theirs. The drivers in ``experiments/`` write their
model files in this form, so ``msr.load`` opens them without importing the drivers.

What can be described: ``nn.Sequential`` of the layers in ``MODULES`` (the MSR layers,
``TaskBatchNorm``, linear and conv layers, the common activations, pools, dropout and
``Flatten``), inside a ``MAML`` or ``ProtoNet`` or alone. A ``MAML`` needs losses from
``torch.nn.functional`` (by name) and SGD's inner update, not one of your own; anything else
is a ``ModelFileError`` naming it (save its ``state_dict`` yourself then).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from msr._files import (
    ModelFileError,
    load_weights_only,
    with_checksum,
    without_checksum,
    write_atomically,
)
from msr.episodic import EpisodicLearner
from msr.layers import MSRConv2d, MSRLinear
from msr.maml import MAML
from msr.norm import TaskBatchNorm
from msr.protonet import ProtoNet

FORMAT = "msr-model/1"

__all__ = [
    "FORMAT",
    "MAX_PARAMETERS",
    "ModelFileError",
    "architecture",
    "build",
    "load",
    "read",
    "save",
]


def _msr_linear(layer: MSRLinear) -> dict[str, Any]:
    return {
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "latent": layer.latent,
        "bias": layer.bias is not None,
        "U": "identity" if layer.U is None else None,
        "learn_U": isinstance(layer.U, nn.Parameter),
    }


def _msr_conv(layer: MSRConv2d) -> dict[str, Any]:
    return {
        "in_channels": layer.in_channels,
        "out_channels": layer.out_channels,
        "kernel_size": list(layer.kernel_size),
        "stride": list(layer.stride),
        "padding": list(layer.padding),
        "dilation": list(layer.dilation),
        "bias": layer.bias is not None,
        "learn_U": any(True for _ in layer.meta_parameters()),
        "dense_latent": None if layer.kronecker else layer.v.shape[0],
    }


def _build_msr_conv(dense_latent: int | None, **arguments: Any) -> MSRConv2d:
    """An ``MSRConv2d`` of that shape; a dense U is a placeholder the state dict fills."""
    if dense_latent is None:
        return MSRConv2d(**arguments)
    kernel = arguments["kernel_size"]
    numel = arguments["out_channels"] * arguments["in_channels"] * kernel[0] * kernel[1]
    return MSRConv2d(**arguments, basis=torch.zeros(numel, dense_latent))


def _attributes(*names: str) -> Callable[[nn.Module], dict[str, Any]]:
    """A describer that reads constructor arguments stored as attributes of the same name."""

    def describe(module: nn.Module) -> dict[str, Any]:
        values = {name: getattr(module, name) for name in names}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    return describe


def _with_bias(*names: str) -> Callable[[nn.Module], dict[str, Any]]:
    def describe(module: nn.Module) -> dict[str, Any]:
        return {**_attributes(*names)(module), "bias": module.bias is not None}

    return describe


_CONV = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups")
_POOL = ("kernel_size", "stride", "padding")

# type name -> (class, its constructor arguments as data, the constructor from them)
MODULES: dict[str, tuple[type[nn.Module], Callable[[Any], dict[str, Any]], Callable[..., Any]]] = {
    "MSRLinear": (MSRLinear, _msr_linear, MSRLinear),
    "MSRConv2d": (MSRConv2d, _msr_conv, _build_msr_conv),
    "TaskBatchNorm": (TaskBatchNorm, _attributes("num_features", "eps"), TaskBatchNorm),
    "Linear": (nn.Linear, _with_bias("in_features", "out_features"), nn.Linear),
    "Conv2d": (nn.Conv2d, _with_bias(*_CONV, "padding_mode"), nn.Conv2d),
    "MaxPool2d": (nn.MaxPool2d, _attributes(*_POOL, "dilation", "ceil_mode"), nn.MaxPool2d),
    "AvgPool2d": (nn.AvgPool2d, _attributes(*_POOL, "ceil_mode"), nn.AvgPool2d),
    "Flatten": (nn.Flatten, _attributes("start_dim", "end_dim"), nn.Flatten),
    "Dropout": (nn.Dropout, _attributes("p"), nn.Dropout),
    "ReLU": (nn.ReLU, _attributes(), nn.ReLU),
    "Tanh": (nn.Tanh, _attributes(), nn.Tanh),
    "Sigmoid": (nn.Sigmoid, _attributes(), nn.Sigmoid),
    "GELU": (nn.GELU, _attributes("approximate"), nn.GELU),
    "Identity": (nn.Identity, _attributes(), nn.Identity),
}

LOSSES = (
    "mse_loss",
    "l1_loss",
    "smooth_l1_loss",
    "huber_loss",
    "cross_entropy",
    "nll_loss",
    "binary_cross_entropy_with_logits",
)


def _loss_name(loss: Callable[..., Any], role: str) -> str:
    for name in LOSSES:
        if getattr(F, name) is loss:
            return name
    raise ModelFileError(
        f"{role} {loss!r} is not one of torch.nn.functional's {', '.join(LOSSES)}: a model file "
        "names its losses; save the state_dict yourself"
    )


def _network(module: nn.Module) -> dict[str, Any]:
    if type(module) is nn.Sequential:
        return {"type": "Sequential", "layers": [_network(layer) for layer in module]}
    for name, (kind, describe, _) in MODULES.items():
        if type(module) is kind:
            return {"type": name, **describe(module)}
    raise ModelFileError(
        f"a {type(module).__name__} cannot be described as data; a model file holds an "
        f"nn.Sequential of {', '.join(MODULES)}: save the state_dict yourself"
    )


def architecture(model: nn.Module) -> dict[str, Any]:
    """``model`` (a ``MAML``, a ``ProtoNet`` or a network) as data that ``build`` rebuilds:
    types, constructor arguments and which parameters are frozen; no tensor values."""
    if isinstance(model, MAML):
        if model.inner_update is not None:
            raise ModelFileError(
                "a MAML with an inner_update of your own cannot be described as data (its rule "
                "is code): save the state_dict yourself"
            )
        learner: dict[str, Any] = {
            "type": "MAML",
            "loss_fn": _loss_name(model.loss_fn, "loss_fn"),
            "inner_loss_fn": _loss_name(model.inner_loss_fn, "inner_loss_fn"),
            "inner_steps": model.trained_inner_steps,
            "learn_inner_lr": all(p.requires_grad for p in model.raw_inner_lrs.values()),
            "per_step_inner_lr": model.per_step_inner_lr,
            "first_order": model.first_order,
            "fast_parameters": list(model.fast_names),
            "batching": model.batching,
            "test_inner_steps": model.test_inner_steps,
        }
    elif isinstance(model, ProtoNet):
        learner = {"type": "ProtoNet", "ways": model.ways, "batching": model.batching}
    elif isinstance(model, EpisodicLearner):
        raise ModelFileError(f"a {type(model).__name__} learner cannot be described as data")
    else:
        learner = {"type": None}
    network = model.model if learner["type"] else model
    frozen = [n for n, p in network.named_parameters() if not p.requires_grad]
    return {"learner": learner, "network": _network(network), "frozen": frozen}


_LEARNER_OPTIONS = {  # what build passes each learner, besides the network
    "MAML": {
        "loss_fn",
        "inner_loss_fn",
        "inner_steps",
        "learn_inner_lr",
        "per_step_inner_lr",
        "first_order",
        "fast_parameters",
        "batching",
        "test_inner_steps",
    },
    "ProtoNet": {"ways", "batching"},
    None: set(),
}

_ADDED_LATER = {"test_inner_steps"}  # options files written before them lack (the default)
MAX_PARAMETERS = 2**28  # values (1 GiB of float32) a model file may describe unless told more


def _build_network(spec: Any) -> nn.Module:
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise ModelFileError(f"a network entry must be a dict with a type, got {spec!r:.80}")
    arguments = {k: v for k, v in spec.items() if k != "type"}
    if spec["type"] == "Sequential":
        layers = arguments.get("layers")
        if not isinstance(layers, list) or set(arguments) != {"layers"}:
            raise ModelFileError(
                f"a Sequential entry holds a list of layers, got {arguments!r:.80}"
            )
        return nn.Sequential(*(_build_network(layer) for layer in layers))
    if spec["type"] not in MODULES:
        raise ModelFileError(f"unknown module type {spec['type']!r} (known: {', '.join(MODULES)})")
    arguments = {k: tuple(v) if isinstance(v, list) else v for k, v in arguments.items()}
    try:
        return MODULES[spec["type"]][2](**arguments)
    except (TypeError, ValueError) as error:
        raise ModelFileError(f"a {spec['type']} with {arguments}: {error}") from None


def _build(spec: Any) -> nn.Module:
    """``build`` without the size check (inside ``torch.device('meta')`` it allocates nothing)."""
    if not isinstance(spec, dict) or {"learner", "network", "frozen"} - set(spec):
        raise ModelFileError("the architecture must hold a learner, a network and frozen")
    network = _build_network(spec["network"])
    frozen, names = spec["frozen"], dict(network.named_parameters())
    if not isinstance(frozen, list) or not all(isinstance(n, str) and n in names for n in frozen):
        raise ModelFileError(f"frozen must list parameters of the network, got {frozen!r:.120}")
    for name in frozen:
        names[name].requires_grad_(False)
    learner = dict(spec["learner"]) if isinstance(spec["learner"], dict) else {}
    kind = learner.pop("type", "missing")
    if kind not in _LEARNER_OPTIONS:
        raise ModelFileError(f"unknown learner type {kind!r} (known: MAML, ProtoNet, None)")
    unknown = set(learner) - _LEARNER_OPTIONS[kind]
    missing = _LEARNER_OPTIONS[kind] - set(learner) - _ADDED_LATER
    if unknown or missing:
        raise ModelFileError(
            f"the {kind} learner's options are off (unknown {sorted(unknown)}, missing "
            f"{sorted(missing)})"
        )
    try:
        if kind is None:
            return network
        if kind == "ProtoNet":
            return ProtoNet(network, **learner)
        losses = {key: learner.pop(key) for key in ("loss_fn", "inner_loss_fn")}
        if bad := [name for name in losses.values() if name not in LOSSES]:
            raise ModelFileError(f"loss {bad[0]!r} is not one of {', '.join(LOSSES)}")
        named = {key: getattr(F, name) for key, name in losses.items()}
        return MAML(network, named["loss_fn"], inner_loss_fn=named["inner_loss_fn"], **learner)
    except (TypeError, ValueError) as error:
        if isinstance(error, ModelFileError):
            raise
        raise ModelFileError(f"the {kind} learner: {error}") from None


def build(spec: dict[str, Any], max_parameters: int = MAX_PARAMETERS) -> nn.Module:
    """The model ``architecture`` described, freshly initialized (``load`` fills its values).
    A malformed description is a ``ModelFileError``; so is one of more than ``max_parameters``
    values (parameters and buffers), counted before anything is allocated."""
    with torch.device("meta"):
        described = _build(spec)
    count = sum(t.numel() for t in described.state_dict().values())
    if count > max_parameters:
        raise ModelFileError(
            f"the architecture describes {count:,} values, more than max_parameters="
            f"{max_parameters:,}: pass a larger max_parameters if you trust the file"
        )
    return _build(spec)


def save(
    model: nn.Module,
    path: str | Path,
    metadata: dict[str, Any] | None = None,
    *,
    state: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (a ``MAML``, ``ProtoNet`` or network) to ``path`` atomically: its
    ``architecture``, its state dict (on the CPU), ``metadata`` (plain values: numbers,
    strings, lists, dicts) and ``state`` (what a training run needs to continue, e.g. an
    optimizer's state dict: tensors and plain values), all checksummed. Returns the path."""
    path = Path(path)
    payload = {
        "format": FORMAT,
        "architecture": architecture(model),
        "state_dict": {n: t.detach().cpu() for n, t in model.state_dict().items()},
        "metadata": metadata or {},
        "state": state or {},
    }
    checked = with_checksum(payload)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda stream: torch.save(checked, stream))
    return path


def read(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """A model file's contents (``architecture``, ``state_dict``, ``metadata``, ``state``),
    loaded without running code and verified against its checksum; a ``ModelFileError`` says
    what is wrong."""
    path = Path(path)
    saved = load_weights_only(path, map_location)
    try:
        payload = without_checksum(saved)
    except ModelFileError as error:
        raise ModelFileError(f"{path} {error}") from None
    if "architecture" not in payload or not isinstance(payload.get("state_dict"), dict):
        raise ModelFileError(f"{path} is a checksummed file but not a model file (no architecture)")
    written = payload.get("format", FORMAT)  # the drivers' model files had none: version 1
    if written != FORMAT:
        raise ModelFileError(f"{path} is in format {written!r}; this msr reads {FORMAT}")
    return {"metadata": {}, "state": {}, **payload}


def load(
    path: str | Path, map_location: Any = "cpu", *, max_parameters: int = MAX_PARAMETERS
) -> nn.Module:
    """The model saved at ``path`` (by ``save`` or a driver), rebuilt from its architecture and
    its values loaded (``map_location`` as in ``torch.load``): the ``MAML`` or ``ProtoNet``
    learner, or the network, as it was saved. A file whose architecture describes more than
    ``max_parameters`` values is refused before anything is built; a malformed one, or a
    state dict that does not fit it, is a ``ModelFileError`` naming the file."""
    payload = read(path, map_location)
    try:
        model = build(payload["architecture"], max_parameters)
    except ModelFileError as error:
        raise ModelFileError(f"{path}: {error}") from None
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    state = payload["state_dict"]
    found = {n: tuple(t.shape) if isinstance(t, torch.Tensor) else t for n, t in state.items()}
    if found != expected:
        off = sorted(n for n in expected.keys() | found.keys() if found.get(n) != expected.get(n))
        shown = ", ".join(f"{n} ({found.get(n)} for {expected.get(n)})" for n in off[:3])
        raise ModelFileError(f"{path}: its state dict does not fit its architecture: {shown}")
    model.load_state_dict(state, assign=True)  # the tensors as loaded
    return model
