"""Every experiment's configuration and presets, in one place: read this file to know a run.

``RunConfig`` holds what every experiment shares (the outer loop, the inner loop, evaluation and
checkpoints); each experiment adds its own fields in a subclass. A preset is a named instance;
``--steps``, ``--inner-lr`` and ``--batching`` override one field of it. Each says its scale
relative to the paper's protocol. ``--set FIELD=VALUE`` overrides any field (e.g. the sweeps of
docs/notes.md: ``--set hidden=64 inner_steps=2``); ``RunConfig.__post_init__`` checks every
value, whichever way it came.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class RunConfig:
    """One preset: second-order MAML-style inner loop, Adam outer loop, periodic evaluation."""

    steps: int  # outer steps
    eval_every: int  # a probe (test MSE, or validation accuracy) every this many steps
    checkpoint_every: int = 500  # and a checkpoint; both also at the last step
    test_tasks: int = 300
    meta_batch: int = 32  # tasks per outer step
    outer_lr: float = 1e-3
    final_lr_fraction: float = 1.0  # cosine decay of the outer lr to this fraction; 1 = constant
    inner_lr: float = 0.1  # initial value of the learned per-tensor inner lrs
    inner_steps: int = 1
    batching: str = "vmap"  # "vmap": a meta-batch as one batched computation; "loop": per task
    # the outer lr of the learned symmetry (U) is symmetry_lr_scale x outer_lr, v's and the
    # inner lrs' is outer_lr (no effect on learners without a learned U)
    symmetry_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        """Every count positive, every rate positive and finite; one line naming the field."""
        for field in fields(self):
            value = getattr(self, field.name)
            if field.type not in ("int", "float"):
                continue  # flags, names and grids: checked where they are used, or below
            kind = int if field.type == "int" else int | float  # a bool is no number here
            if isinstance(value, bool) or not isinstance(value, kind):
                raise ValueError(f"{field.name} must be {field.type}, got {value!r}")
            if field.name in NON_NEGATIVE:
                good = value >= 0 and math.isfinite(value)
            else:
                good = value > 0 and math.isfinite(value)
            if not good:
                rule = ">= 0" if field.name in NON_NEGATIVE else "positive"
                raise ValueError(f"{field.name} must be {rule} and finite, got {value!r}")
        if self.final_lr_fraction > 1:
            raise ValueError(f"final_lr_fraction must be <= 1, got {self.final_lr_fraction}")
        if self.batching not in ("vmap", "loop", "grouped"):
            raise ValueError(f"batching must be vmap, loop or grouped, got {self.batching!r}")


@dataclass(frozen=True)
class RotationConfig(RunConfig):
    """Table 2 adds the swept protocol's inner-lr sweep: short runs from each candidate."""

    # 0.1 * 2^k: the step that one inner step can use lies near C/2 for a plain conv here (the
    # MSE averages over C x 900 outputs), just below its stability edge; a coarser grid (x3)
    # picked 30 for D8 (C/2 = 24), over the edge, and left MAML-Conv 6x above its level
    lr_candidates: tuple[float, ...] = tuple(round(0.1 * 2**k, 1) for k in range(12))
    sweep_steps: int = 50
    sweep_tasks: int = 100  # scored on this many *training* tasks


NON_NEGATIVE = ("symmetry_init_noise",)  # the numeric fields that may be 0
AUGMENT = ("queries", "none")  # FewShotConfig.augment: what the meta-training episodes augment


@dataclass(frozen=True)
class FewShotConfig(RunConfig):
    """Table 3 adds the Conv-4 width, the episode shape and the image size."""

    checkpoint_every: int = 500
    test_tasks: int = 600
    inner_lr: float = 0.4
    # tasks folded into the channels: the fastest path on Conv-4 (docs/performance.md); vmap
    # loses on conv nets of this width
    batching: str = "grouped"
    hidden: int = 64  # Conv-4 channels
    queries: int = 15  # per class, training and test episodes
    val_tasks: int = 100  # validation episodes per probe
    eval_chunk: int = 25  # episodes scored at once in validation and test (bounds memory)
    first_order: bool = False
    image_size: int = 28
    # Test-time inner steps: each MAML-family job scores every count of this grid on
    # ``selection_tasks`` validation episodes and is tested once, at its best (ties: fewer steps)
    test_inner_steps: tuple[int, ...] = (1, 3, 5, 10)
    selection_tasks: int = 600
    analysis_tasks: int = 50  # held-out episodes of the symmetry and conditioning analysis
    # the meta-training query sets: "queries" augmented (Aug-Omniglot, the paper's) or "none"
    # (docs/results.md's ablation); validation, test and analysis episodes are augmented
    # either way
    augment: str = "queries"
    # MSR's Kronecker factors start at the identity plus N(0, symmetry_init_noise^2) entries
    symmetry_init_noise: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.augment not in AUGMENT:
            raise ValueError(f"augment must be one of {AUGMENT}, got {self.augment!r}")
        grid = self.test_inner_steps
        if not grid or len(set(grid)) != len(grid) or any(k < 0 for k in grid):
            raise ValueError(f"test_inner_steps must be distinct counts >= 0, got {grid}")


# Table 1 (experiments.synthetic): 1 inner SGD step, 32 tasks per step, as in the paper.
SYNTHETIC = {
    # the paper's protocol run to convergence (its 1,000 steps are not), lr annealed at the end
    "paper": RunConfig(steps=8000, eval_every=500, final_lr_fraction=0.01),
    # the README's main job: the same protocol, 1,500 steps (about 1/5 of paper)
    "quick": RunConfig(steps=1500, eval_every=500),
    "tiny": RunConfig(steps=6, eval_every=3, test_tasks=10, meta_batch=4),  # tests only
}

# Table 2 (experiments.rotation). Per-task loop, not vmap: on these conv layers it measured
# faster overall (32 tasks, 2 threads: 350 vs 440 ms per D4 step, 2x faster D4 evaluation).
ROTATION = {
    "paper": RotationConfig(steps=1000, eval_every=100, batching="loop"),  # the paper's
    # a preview, 1/8 of the paper's steps at 3x its outer lr, so that a few hundred steps show
    # the paper preset's ordering (at lr 1e-3 nothing separates before ~500 steps)
    "quick": RotationConfig(
        steps=120,
        eval_every=50,
        test_tasks=100,
        outer_lr=3e-3,
        batching="loop",
        lr_candidates=(0.1, 0.4, 1.6, 6.4, 25.6, 102.4),
        sweep_steps=10,
        sweep_tasks=50,
    ),
    "tiny": RotationConfig(  # tests only
        steps=4,
        eval_every=2,
        test_tasks=6,
        meta_batch=3,
        lr_candidates=(0.1, 10.0),
        sweep_steps=2,
        sweep_tasks=4,
    ),
}

_TINY_FEW_SHOT = FewShotConfig(
    steps=4,
    eval_every=2,
    checkpoint_every=2,
    hidden=4,
    meta_batch=2,
    queries=2,
    test_tasks=4,
    val_tasks=8,
    eval_chunk=2,  # validations in several chunks, so that a stop can land inside one
    test_inner_steps=(1, 2),
    selection_tasks=4,
    analysis_tasks=2,
)
# Table 3 (experiments.few_shot), per data set.
FEW_SHOT = {
    "omniglot": {
        "paper": FewShotConfig(steps=60_000, eval_every=1000),  # the paper's: hours on a GPU
        # 2 CPU cores, under 30 minutes per method: 1/20 of the steps, 1/4 of the tasks per
        # step, 1/3 of the queries (about 1/80 of the episodes) and half the channels
        "cpu": FewShotConfig(
            steps=3000, eval_every=1000, checkpoint_every=250, hidden=32, meta_batch=8, queries=5
        ),
        # the budget of an independent reimplementation (docs/notes.md), about 43 min per
        # method on one core: 1/5 of the steps, 1/8 of the tasks per step, 1/3 of the queries
        # (1/120 of the query images) and half the channels
        "cpu-long": FewShotConfig(
            steps=12_000, eval_every=1000, checkpoint_every=250, hidden=32, meta_batch=4, queries=5
        ),
        "tiny": _TINY_FEW_SHOT,  # tests only
    },
    "miniimagenet": {
        "paper": FewShotConfig(
            steps=60_000, eval_every=1000, meta_batch=4, inner_steps=5, inner_lr=0.01, image_size=84
        ),
        # 1/40 of the steps, 1/3 of the queries, half the channels and half the image side
        "cpu": FewShotConfig(
            steps=1500,
            eval_every=500,
            checkpoint_every=250,
            hidden=32,
            meta_batch=4,
            queries=5,
            inner_lr=0.01,
            image_size=42,
        ),
        "tiny": replace(_TINY_FEW_SHOT, image_size=16),
    },
}
FEW_SHOT["folder"] = FEW_SHOT["miniimagenet"]  # your own RGB images: mini-ImageNet's scales
