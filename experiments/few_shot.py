"""Table 3 of the MSR paper: few-shot classification on Aug-Omniglot and Aug-MiniImageNet.

    python -m experiments.few_shot --dataset omniglot|miniimagenet --method METHOD \
        --ways N --shots K --preset cpu|paper --out DIR [--data PATH] [--resume]

Methods on the Conv-4 backbone: maml, maml-big (wider, at least as many meta-parameters as
msr), anil (only the head adapts), protonet, msr (every conv an MSRConv2d with a learned
Kronecker U). Only the query sets are augmented (crop, flips, rotation), so the learned update
has to absorb those symmetries. Writes DIR/metrics.jsonl as it goes, DIR/checkpoint.pt
atomically every ``checkpoint_every`` steps and at a stop by SIGINT / SIGTERM (``--resume``
continues from it, bit for bit on the same device, and on another device too), DIR/results.json
with the test accuracy ± 95% CI beside the paper's number, and
DIR/model_<method>_<ways>w<shots>s.pt (the trained learner).
``--device`` picks the device: the images are moved there once, and every episode is sampled
and augmented there.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from experiments.common import (
    DEVICE_HELP,
    OVERWRITE_HELP,
    REPO_ROOT,
    SEED_HELP,
    TENSORBOARD_HELP,
    DefaultsHelpFormatter,
    MetricsLog,
    differences,
    keep_freed_memory,
    keep_lines,
    launched_by_torchrun,
    load_checked,
    mean_ci95,
    positive_int,
    provenance,
    resolve_device,
    save_checked,
    save_model,
    seed_value,
    write_results,
)
from experiments.engine import outer_steps
from experiments.rundir import (
    RunError,
    Stopped,
    check_stop,
    claim_output,
    run_cli,
)
from msr import MAML, EpisodicLearner, ProtoNet, TaskBatch, accuracy
from msr.data import (
    ImageClasses,
    augment_images,
    check_episodes,
    load_miniimagenet,
    load_omniglot,
    sample_episodes,
)
from msr.models import conv4
from msr.streams import keyed_generator

METHODS = ("maml", "maml-big", "anil", "protonet", "msr")
CHECKPOINT_FIELDS = {"run", "config", "step", "learner", "optimizer", "elapsed_s", "unvalidated"}
DATASETS = ("omniglot", "miniimagenet")
DEFAULT_DATA = {
    "omniglot": REPO_ROOT.parent / "shared" / "data" / "omniglot" / "omniglot_28x28_lanczos.npz"
}
# The paper's Table 3: accuracy (%) and 95% CI per method, dataset, (ways, shots).
PAPER_TABLE3: dict[str, dict[tuple[str, int, int], tuple[float, float]]] = {
    "maml": {
        ("omniglot", 5, 1): (87.3, 0.5),
        ("omniglot", 5, 5): (93.6, 0.3),
        ("omniglot", 20, 1): (67.0, 0.4),
        ("omniglot", 20, 5): (79.9, 0.3),
        ("miniimagenet", 5, 1): (42.5, 1.1),
        ("miniimagenet", 5, 5): (61.5, 1.0),
    },
    "maml-big": {
        ("omniglot", 5, 1): (89.3, 0.4),
        ("omniglot", 5, 5): (94.8, 0.3),
        ("omniglot", 20, 1): (69.6, 0.4),
        ("omniglot", 20, 5): (83.2, 0.3),
        ("miniimagenet", 5, 1): (37.2, 1.1),
        ("miniimagenet", 5, 5): (63.2, 1.0),
    },
    "anil": {
        ("omniglot", 5, 1): (86.4, 0.5),
        ("omniglot", 5, 5): (93.2, 0.3),
        ("omniglot", 20, 1): (67.5, 3.5),
        ("omniglot", 20, 5): (79.8, 0.3),
        ("miniimagenet", 5, 1): (43.0, 1.1),
        ("miniimagenet", 5, 5): (62.3, 1.0),
    },
    "protonet": {
        ("omniglot", 5, 1): (92.9, 0.4),
        ("omniglot", 5, 5): (97.4, 0.2),
        ("omniglot", 20, 1): (85.1, 0.3),
        ("omniglot", 20, 5): (94.3, 0.2),
        ("miniimagenet", 5, 1): (34.6, 0.5),
        ("miniimagenet", 5, 5): (54.5, 0.6),
    },
    "msr": {
        ("omniglot", 5, 1): (95.3, 0.3),
        ("omniglot", 5, 5): (97.7, 0.2),
        ("omniglot", 20, 1): (84.3, 0.2),
        ("omniglot", 20, 5): (92.6, 0.2),
        ("miniimagenet", 5, 1): (45.5, 1.1),
        ("miniimagenet", 5, 5): (65.2, 1.0),
    },
}


@dataclass(frozen=True)
class FewShotConfig:
    """One preset: backbone width, episode shape, inner and outer loops, evaluation."""

    steps: int
    hidden: int = 64
    meta_batch: int = 32
    queries: int = 15  # per class, training and test episodes
    inner_steps: int = 1
    inner_lr: float = 0.4
    outer_lr: float = 1e-3
    first_order: bool = False
    test_tasks: int = 600
    eval_every: int = 1000
    checkpoint_every: int = 500
    image_size: int = 28
    batching: str = "loop"


PRESETS = {
    "omniglot": {
        # the paper's protocol: hours on a GPU
        "paper": FewShotConfig(steps=60_000),
        # 2 CPU cores, under 30 minutes per method: narrower net, smaller episodes, fewer steps
        "cpu": FewShotConfig(
            steps=3000, hidden=32, meta_batch=8, queries=5, eval_every=1000, checkpoint_every=250
        ),
        "tiny": FewShotConfig(
            steps=4,
            hidden=4,
            meta_batch=2,
            queries=2,
            test_tasks=4,
            eval_every=2,
            checkpoint_every=2,
        ),
    },
    "miniimagenet": {
        "paper": FewShotConfig(
            steps=60_000, meta_batch=4, inner_steps=5, inner_lr=0.01, image_size=84
        ),
        "cpu": FewShotConfig(
            steps=1500,
            hidden=32,
            meta_batch=4,
            queries=5,
            inner_lr=0.01,
            image_size=42,
            eval_every=500,
            checkpoint_every=250,
        ),
        "tiny": FewShotConfig(
            steps=4,
            hidden=4,
            meta_batch=2,
            queries=2,
            test_tasks=4,
            eval_every=2,
            checkpoint_every=2,
            image_size=16,
        ),
    },
}


def load_split(dataset: str, data: Path, split: str, image_size: int) -> ImageClasses:
    """The 'train', 'val' or 'test' classes of a data set."""
    if dataset == "omniglot":
        return load_omniglot(data, f"vinyals-{split}", image_size=image_size)
    return load_miniimagenet(data, split, image_size=image_size)


def load_splits(
    args: argparse.Namespace, cfg: FewShotConfig, data: Path, device: torch.device
) -> list[ImageClasses]:
    """The train, val and test classes on ``device``, checked to hold episodes of the run's
    shape before anything is written; a bad path or file, or too few classes or images, is a
    ``RunError``."""
    splits = []
    for split in ("train", "val", "test"):
        try:
            classes = load_split(args.dataset, data, split, cfg.image_size)
            check_episodes(classes, args.ways, args.shots, cfg.queries)
        except (OSError, ValueError) as error:
            raise RunError(f"{split} split of {data}: {error}") from None
        if classes.image_shape[1:] != (cfg.image_size, cfg.image_size):
            size = "x".join(map(str, classes.image_shape[1:]))
            raise RunError(
                f"{split} split of {data}: {size} images, but the preset {args.preset} needs "
                f"{cfg.image_size}x{cfg.image_size}"
            )
        splits.append(classes.to(device))
    return splits


def count_parameters(learner: EpisodicLearner) -> int:
    return sum(p.numel() for p in learner.parameters() if p.requires_grad)


def build_learner(method: str, channels: int, ways: int, cfg: FewShotConfig) -> EpisodicLearner:
    """The method's learner on the Conv-4 backbone."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    batching = cfg.batching  # type: ignore[assignment]
    if method == "protonet":
        return ProtoNet(conv4(channels, cfg.image_size, cfg.hidden), ways, batching=batching)
    hidden = cfg.hidden
    if method == "maml-big":  # the narrowest net with at least MSR's meta-parameters
        target = count_parameters(build_learner("msr", channels, ways, cfg))
        while (
            count_parameters(build_learner("maml", channels, ways, replace(cfg, hidden=hidden)))
            < target
        ):
            hidden += 1
    model = conv4(channels, cfg.image_size, hidden, ways, learn_symmetry=method == "msr")
    head = [f"{len(model) - 1}.weight", f"{len(model) - 1}.bias"]
    return MAML(
        model,
        F.cross_entropy,
        inner_steps=cfg.inner_steps,
        inner_lr=cfg.inner_lr,
        first_order=cfg.first_order,
        batching=batching,
        fast_parameters=head if method == "anil" else None,
    )


def evaluate(
    learner: EpisodicLearner,
    tasks_source: Callable[[int], TaskBatch],
    cfg: FewShotConfig,
    chunk: int = 25,
) -> torch.Tensor:
    """Per-task query accuracy (%) over ``cfg.test_tasks`` episodes, in chunks to bound memory."""
    scores = []
    for start in range(0, cfg.test_tasks, chunk):
        check_stop()
        tasks = tasks_source(min(chunk, cfg.test_tasks - start))
        scores.append(learner.evaluate(tasks, {"accuracy": accuracy}, chunk_size=chunk)["accuracy"])
    return 100.0 * torch.cat(scores)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=DefaultsHelpFormatter
    )
    parser.add_argument("--dataset", choices=DATASETS, default="omniglot", help="the data set")
    parser.add_argument("--data", type=Path, help="data path (default: the shared Omniglot .npz)")
    parser.add_argument("--method", choices=METHODS, required=True, help="the learner")
    parser.add_argument("--ways", type=positive_int, default=5, help="classes per episode")
    parser.add_argument("--shots", type=positive_int, default=1, help="support images per class")
    parser.add_argument(
        "--preset", choices=("cpu", "paper", "tiny"), default="cpu", help="the scale of the run"
    )
    parser.add_argument("--seed", type=seed_value, default=0, help=SEED_HELP)
    parser.add_argument("--steps", type=positive_int, help="override the preset's outer steps")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--tensorboard", action="store_true", help=TENSORBOARD_HELP)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    args = parser.parse_args(argv)
    if launched_by_torchrun():
        parser.error("this driver runs as one process (it does not join a torchrun process group)")
    keep_freed_memory()
    cfg = PRESETS[args.dataset][args.preset]
    if args.steps is not None:
        cfg = replace(cfg, steps=args.steps)
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    data = args.data or DEFAULT_DATA.get(args.dataset)
    if data is None:
        parser.error(f"--data is required for {args.dataset} (the standard layout's root)")
    splits = load_splits(args, cfg, data, device)  # before --out is touched: nothing is lost
    with claim_output(args.out, args.resume, args.overwrite):
        return _train(args, cfg, device, splits)


def _train(
    args: argparse.Namespace,
    cfg: FewShotConfig,
    device: torch.device,
    splits: Sequence[ImageClasses],
) -> dict[str, Any]:
    """Meta-train, checkpoint, test and write the results of one few-shot run."""
    checkpoint = args.out / "checkpoint.pt"
    if args.resume and not checkpoint.exists():
        raise RunError(f"--resume given but {checkpoint} does not exist")
    run_provenance = provenance(args.seed, args.preset)  # the code as it starts, not as it ends

    train_classes, val_classes, test_classes = splits
    channels = train_classes.image_shape[0]
    torch.manual_seed(args.seed)
    learner = build_learner(args.method, channels, args.ways, cfg).to(device)
    optimizer = torch.optim.Adam(learner.parameters(), lr=cfg.outer_lr)
    first_step, elapsed = 1, 0.0
    run_identity = {
        k: str(getattr(args, k)) for k in ("dataset", "method", "ways", "shots", "seed", "preset")
    }
    if args.resume:
        state = load_checked(checkpoint, map_location=device)
        missing = CHECKPOINT_FIELDS - set(state)
        if missing:
            raise RunError(
                f"{checkpoint} is not a checkpoint of this driver (no {sorted(missing)})"
            )
        # The same run, but --steps may grow (to continue a finished run for longer) down to
        # the step the checkpoint reached: a shorter run would be labelled with fewer steps
        # than its model was trained for.
        theirs = {"run": state["run"], "config": {**state["config"], "steps": cfg.steps}}
        if different := differences(theirs, {"run": run_identity, "config": asdict(cfg)}):
            raise RunError(
                f"{checkpoint} belongs to another run; differing (theirs, ours): {different}"
            )
        if cfg.steps < state["step"]:
            raise RunError(
                f"{checkpoint} has trained {state['step']} steps, more than --steps {cfg.steps}: "
                "resume with at least as many (or start a new run)"
            )
        learner.load_state_dict(state["learner"])
        optimizer.load_state_dict(state["optimizer"])
        first_step, elapsed = state["step"] + 1, state["elapsed_s"]
        keep_lines(args.out / "metrics.jsonl", lambda record: record["step"] <= state["step"])
    else:
        (args.out / "metrics.jsonl").unlink(missing_ok=True)

    def train_tasks(step: int) -> TaskBatch:
        """Step ``step``'s meta-batch, from its own stream: a resumed run, on any device,
        draws what an uninterrupted one would (the same episodes on the same device type)."""
        sampler = keyed_generator(args.seed, step, device)
        return sample_episodes(
            train_classes,
            cfg.meta_batch,
            args.ways,
            args.shots,
            cfg.queries,
            sampler,
            augment_images,
        )

    def episodes(classes: ImageClasses, seed: int) -> Callable[[int], TaskBatch]:
        generator = torch.Generator(device=device).manual_seed(seed)
        return lambda n: sample_episodes(
            classes, n, args.ways, args.shots, cfg.queries, generator, augment_images
        )

    def save_checkpoint(step: int, unvalidated: float | None = None) -> None:
        """``unvalidated``: the train loss of ``step``, whose validation a stop cut off (a
        resumed run validates it first)."""
        payload = {
            "run": run_identity,
            "config": asdict(cfg),
            "step": step,
            "learner": learner.state_dict(),
            "optimizer": optimizer.state_dict(),
            "elapsed_s": time.perf_counter() - start,
            "unvalidated": unvalidated,
        }
        save_checked(checkpoint, payload)

    def validate(step: int, train_loss: float) -> None:
        try:
            acc = evaluate(learner, episodes(val_classes, args.seed), replace(cfg, test_tasks=100))
        except Stopped:  # step is trained: keep it, and owe its validation
            save_checkpoint(step, unvalidated=train_loss)
            raise
        log.write(
            step=step,
            train_loss=train_loss,
            val_accuracy=acc.mean().item(),
            elapsed_s=time.perf_counter() - start,
        )

    start = time.perf_counter() - elapsed
    if not args.resume:
        save_checkpoint(0)  # a run stopped before its first checkpoint resumes from here
    with (
        MetricsLog(
            args.out / "metrics.jsonl", args.out / "tensorboard" if args.tensorboard else None
        ) as log,
        tqdm(total=cfg.steps, initial=first_step - 1, desc=f"{args.method}", unit="step") as bar,
    ):
        if args.resume and state["unvalidated"] is not None:
            validate(state["step"], state["unvalidated"])
            save_checkpoint(state["step"])
        for step, loss in outer_steps(
            learner,
            optimizer,
            train_tasks,
            range(first_step, cfg.steps + 1),
            what=f"{args.method} on {args.dataset}",
            kept=f"the last good checkpoint ({checkpoint}) is kept",
            on_stop=save_checkpoint,  # keep every finished step: --resume continues from it
        ):
            bar.update(1)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                validate(step, loss)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save_checkpoint(step)
    train_wall = time.perf_counter() - start
    accuracies = evaluate(learner, episodes(test_classes, args.seed), cfg)
    mean, ci95 = mean_ci95(accuracies)
    paper = PAPER_TABLE3[args.method].get((args.dataset, args.ways, args.shots))
    results = {
        **run_provenance,
        "config": asdict(cfg),
        "method": args.method,
        "dataset": args.dataset,
        "ways": args.ways,
        "shots": args.shots,
        "accuracy": mean,
        "ci95": ci95,
        "test_tasks": cfg.test_tasks,
        "paper_accuracy": paper[0] if paper else None,
        "paper_ci95": paper[1] if paper else None,
        "chance": 100.0 / args.ways,
        "parameters": count_parameters(learner),
        "steps": cfg.steps,
        "train_wall_s": train_wall,
        "device": str(device),
    }
    write_results(args.out / "results.json", results)
    tags = {"method": args.method, "dataset": args.dataset, "ways": args.ways, "shots": args.shots}
    model_file = args.out / f"model_{args.method}_{args.ways}w{args.shots}s.pt"
    save_model(model_file, learner, "few_shot", args.seed, tags, cfg)
    paper_text = f"{paper[0]:.1f} ± {paper[1]:.1f}" if paper else "n/a"
    print(
        f"\n{args.method} on Aug-{args.dataset} {args.ways}-way {args.shots}-shot "
        f"(preset {args.preset}, seed {args.seed}, {cfg.steps} steps on {device}, "
        f"train {train_wall:.0f} s): "
        f"{mean:.1f} ± {ci95:.1f}% over {cfg.test_tasks} test tasks "
        f"(paper {paper_text}; chance {100 / args.ways:.0f}%)"
    )
    return results


if __name__ == "__main__":
    run_cli(main, "experiments.few_shot")
