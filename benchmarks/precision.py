"""How far reduced precision moves the few-shot meta-gradient, beside how sensitive it is anyway.

    python -m benchmarks.precision [--device auto|cpu|cuda] [--full]

For MAML and MSR on the setting of ``benchmarks.few_shot_step`` (the paper's Omniglot 5-way
1-shot outer step; on the CPU scaled down unless ``--full``), one meta-batch's meta-gradient at
initialization is computed in fp32 and compared (``|g - g_fp32| / |g_fp32|``, over all
parameters) with:
- ``fp64``: the rounding floor of fp32 itself;
- ``tf32 (emulated)``: every conv, linear and einsum with its multiplied inputs (not a bias)
  and the gradient flowing into it rounded to TF32's 10-bit mantissa (``tf32_emulation``); runs
  on any device. The convs inside double backward are not rounded, so this is a lower bound of
  sorts;
- ``tf32``: on CUDA, the real TF32 (``allow_tf32``), which also checks the emulation;
- ``bf16 autocast``: ``torch.autocast`` with bfloat16, real on the CPU and on CUDA;
- ``fp32, weights as tf32``: plain fp32 again, on the weights rounded once to TF32's precision:
  how much the meta-gradient moves for a change of the weights of TF32's size, by itself (its
  ReLUs and max-pools make it piecewise smooth, so such changes can switch pieces);
- ``next meta-batch``: the next step's meta-batch: the sampling noise SGD lives with anyway.
The drivers compute in fp32; docs/performance.md ("Devices and GPUs") says why, from this
benchmark's figures.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace

import torch

from benchmarks.few_shot_step import (
    METHODS,
    WAYS,
    benchmark_config,
    episodes,
    omniglot_train,
    setting_name,
)
from experiments.few_shot import build_learner
from experiments.presets import FewShotConfig
from msr import TaskBatch
from msr.data import ImageClasses
from msr.devices import resolve_device
from msr.testing import TF32_DROPPED_BITS, round_mantissa, tf32_emulation

TOLERANCE = 0.1  # of the change to the next meta-batch (``within_tolerance``)


@contextlib.contextmanager
def _real_tf32() -> Iterator[None]:
    """TF32 in CUDA matmuls and convolutions inside; the flags as they were afterwards."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _flat_meta_gradient(learner, tasks: TaskBatch, context=contextlib.nullcontext) -> torch.Tensor:
    learner.zero_grad()
    with context():
        learner.meta_backward(tasks)
    grads = [p.grad.flatten() for _, p in sorted(learner.named_parameters()) if p.grad is not None]
    return torch.cat(grads).double().cpu()


def _weights_rounded(learner, dropped_bits: int):
    """A copy of ``learner`` whose network weights are rounded once (its inner lrs are not)."""
    twin = copy.deepcopy(learner)
    with torch.no_grad():
        for p in twin.model.parameters():
            p.copy_(round_mantissa(p, dropped_bits))
    return twin


def compare(
    method: str, cfg: FewShotConfig, classes: ImageClasses, names: tuple[str, ...] | None = None
) -> dict[str, float]:
    """Relative meta-gradient change of each variant (all, or ``names``) against fp32, on
    episodes from ``classes`` (``omniglot_train``), on their device."""
    torch.manual_seed(0)
    device = classes.flat.device
    learner = build_learner(method, 1, WAYS, replace(cfg, batching="loop")).to(device)
    tasks = episodes(classes, cfg, 0, device)
    reference = _flat_meta_gradient(learner, tasks)
    variants: dict[str, Callable[[], torch.Tensor]] = {
        "fp64": lambda: _flat_meta_gradient(
            copy.deepcopy(learner).double(), tasks.to(dtype=torch.float64)
        ),
        "tf32 (emulated)": lambda: _flat_meta_gradient(learner, tasks, tf32_emulation),
        "bf16 autocast": lambda: _flat_meta_gradient(
            learner, tasks, lambda: torch.autocast(device.type, dtype=torch.bfloat16)
        ),
        "fp32, weights as tf32": lambda: _flat_meta_gradient(
            _weights_rounded(learner, TF32_DROPPED_BITS), tasks
        ),
        "next meta-batch": lambda: _flat_meta_gradient(learner, episodes(classes, cfg, 1, device)),
    }
    if device.type == "cuda":
        variants["tf32"] = lambda: _flat_meta_gradient(learner, tasks, _real_tf32)
    return {
        name: ((variants[name]() - reference).norm() / reference.norm()).item()
        for name in names or variants
    }


def within_tolerance(changes: dict[str, float], name: str) -> bool:
    """Whether variant ``name`` moves the meta-gradient less than ``TOLERANCE`` times the next
    meta-batch does: as uncorrelated noise it would then add under 2% to the variance of the
    meta-gradients SGD follows (two meta-batches differ by sqrt(2) of their spread)."""
    return changes[name] < TOLERANCE * changes["next meta-batch"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--full", action="store_true", help="the paper setting on the CPU too")
    args = parser.parse_args()
    device = resolve_device(args.device)
    cfg = benchmark_config(device, args.full)
    print(
        f"Meta-gradient change against fp32 at initialization, one meta-batch, {device} "
        f"({setting_name(cfg)}; torch {torch.__version__}):"
    )
    classes = omniglot_train(device)
    rows = {}
    for method in METHODS:
        rows[method] = compare(method, cfg, classes)
        changes = rows[method]
        print(
            f"{method:5s} "
            + "  ".join(
                f"{k}: {v:.2g}{'' if within_tolerance(changes, k) else ' (out)'}"
                for k, v in changes.items()
                if k != "next meta-batch"
            )
            + f"  next meta-batch: {changes['next meta-batch']:.2g}"
        )
    print(f"(out): not below {TOLERANCE} x the next meta-batch's change")
    print(json.dumps({"device": str(device), "config": asdict(cfg), "rows": rows}))


if __name__ == "__main__":
    main()
