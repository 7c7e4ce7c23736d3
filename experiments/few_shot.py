"""Table 3 of the MSR paper: few-shot classification on Aug-Omniglot and Aug-MiniImageNet.

    python -m experiments.few_shot --dataset omniglot|miniimagenet|folder --methods METHOD ... \
        [--ways N ...] [--shots K ...] --preset cpu|paper --out DIR [--data PATH] [--resume]

``--dataset folder --data DIR`` trains on your own images: ``DIR/train``, ``DIR/val`` and
``DIR/test``, each a tree ``<class name>/<image>`` (``msr.data.ImageClasses.from_folder``),
read as RGB at the preset's image size (mini-ImageNet's presets; ``--set image_size=N``).
A class name in two splits is refused: the splits' classes must be disjoint.

Methods on the Conv-4 backbone: maml, maml-big (wider, at least as many meta-parameters as
msr), anil (only the head adapts), protonet, msr (every conv an MSRConv2d with a learned
Kronecker U). Only the query sets are augmented (crop, flips, rotation), so the learned update
has to absorb those symmetries; ``--augment none`` leaves the meta-training queries plain (an
ablation: validation and test stay augmented). Each job (method, ways, shots, seed) is validated on
``val_tasks`` episodes every ``eval_every`` steps and tested on ``test_tasks`` episodes of the
test classes (accuracy ± 95% CI beside the paper's number), through ``experiments.run``.
``--device`` picks the device: the images are moved there once, and every episode is sampled
and augmented there.
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from experiments import cli
from experiments.cli import positive_int
from experiments.control import RunError, raise_if_stopped, run_cli
from experiments.presets import AUGMENT, FEW_SHOT, FewShotConfig
from experiments.report import ACCURACY, plot_curves
from experiments.run import Experiment, Plan, Tags, build_maml
from experiments.rundir import REPO_ROOT, read_records, save_figure
from msr import (
    MAML,
    EpisodicLearner,
    ProtoNet,
    TaskBatch,
    accuracy,
    partition_parameters,
)
from msr.data import (
    ImageClasses,
    augment_images,
    check_episodes,
    find_omniglot,
    fingerprint,
    load_miniimagenet,
    load_omniglot,
    sample_episodes,
)
from msr.distributed import sharded_evaluate, sharded_map
from msr.equivariance import adapted_image_symmetry
from msr.models import conv4
from msr.recovery import factor_singular_values
from msr.stats import mean_ci95

METHODS = ("maml", "maml-big", "anil", "protonet", "msr")
DATASETS = ("omniglot", "miniimagenet", "folder")
CHANNELS = {"omniglot": 1, "miniimagenet": 3, "folder": 3}
# the development and CI data beside this checkout: the data rule's last root, unless
# MSR_NO_SHARED_DATA is set (the suite's run as a fresh clone would see it)
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def data_roots_beside_checkout() -> list[Path]:
    """The roots the drivers add to the library's data rule (``msr.data.locations``)."""
    return [] if os.environ.get("MSR_NO_SHARED_DATA") else [SHARED_DATA]


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


@functools.lru_cache(maxsize=3)  # the check before --out, and every job of this process
def load_splits(
    dataset: str, data: Path, image_size: int, device: torch.device
) -> tuple[ImageClasses, ...]:
    """The train, val and test classes of a data set on ``device``; a bad path or file, or
    images of another size than the preset's, is a ``RunError``."""
    splits = []
    for split in ("train", "val", "test"):
        try:
            if dataset == "omniglot":
                classes = load_omniglot(data, f"vinyals-{split}", image_size=image_size)
            elif dataset == "folder":
                classes = ImageClasses.from_folder(data / split, image_size, mode="RGB")
            else:
                classes = load_miniimagenet(data, split, image_size=image_size)
        except (OSError, ValueError) as error:
            raise RunError(f"{split} split of {data}: {error}") from None
        if classes.image_shape[1:] != (image_size, image_size):
            size = "x".join(map(str, classes.image_shape[1:]))
            raise RunError(
                f"{split} split of {data}: {size} images, but the preset needs "
                f"{image_size}x{image_size}"
            )
        splits.append(classes.to(device))
    names = [set(classes.names) for classes in splits]
    if dataset == "folder" and (
        shared := (names[0] & names[1]) | (names[0] & names[2]) | (names[1] & names[2])
    ):
        raise RunError(
            f"{data}: classes in more than one split ({', '.join(sorted(shared)[:5])}): the "
            "train, val and test classes must be disjoint"
        )
    return tuple(splits)


def count_parameters(learner: EpisodicLearner) -> int:
    return sum(p.numel() for p in learner.parameters() if p.requires_grad)


def build_learner(method: str, channels: int, ways: int, cfg: FewShotConfig) -> EpisodicLearner:
    """The method's learner on the Conv-4 backbone."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if method == "protonet":
        backbone = conv4(channels, cfg.image_size, cfg.hidden)
        return ProtoNet(backbone, ways, batching=cfg.batching)  # type: ignore[arg-type]
    hidden = cfg.hidden
    if method == "maml-big":  # the narrowest net with at least MSR's meta-parameters
        counted = replace(cfg, symmetry_init_noise=0.0)  # counting draws no random numbers
        target = count_parameters(build_learner("msr", channels, ways, counted))
        while (
            count_parameters(build_learner("maml", channels, ways, replace(cfg, hidden=hidden)))
            < target
        ):
            hidden += 1
    model = conv4(channels, cfg.image_size, hidden, ways, learn_symmetry=method == "msr")
    if method == "msr" and cfg.symmetry_init_noise > 0:
        symmetry, _ = partition_parameters(model)
        with torch.no_grad():  # the factors leave the identity (a plain conv) at random
            for name, factor in model.named_parameters():
                if name in symmetry:
                    factor.add_(torch.randn_like(factor), alpha=cfg.symmetry_init_noise)
    head = [f"{len(model) - 1}.weight", f"{len(model) - 1}.bias"]
    return build_maml(
        model,
        cfg,
        loss_fn=F.cross_entropy,
        first_order=cfg.first_order,
        fast_parameters=head if method == "anil" else None,
    )


def analyze(
    learner: EpisodicLearner, tasks: TaskBatch, inner_steps: int | None, max_steps: int
) -> dict[str, Any]:
    """What a trained learner's adapted networks do with the augmentation's transformations, on
    held-out ``tasks`` (``msr.equivariance.adapted_image_symmetry``: per conv block and for the
    logits), and for a MAML-family learner how its inner problem is conditioned: the mean
    support loss after 0..``max_steps`` inner steps, the learned inner lrs, and the ends of the
    support Hessian's spectrum in the fast parameters, plain and scaled by the lrs
    (``MAML.inner_curvature``; means over the tasks)."""
    if isinstance(learner, MAML):

        def adapt(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.nn.Sequential, Any]:
            network = learner.adapted_model(x, y, inner_steps=inner_steps)
            return network, network

    else:

        def adapt(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.nn.Sequential, Any]:
            return learner.model, learner.classifier(x, y)

    found: dict[str, Any] = {
        "episodes": tasks.num_tasks,
        "image_symmetry": adapted_image_symmetry(adapt, tasks),
    }
    if isinstance(learner, MAML):
        support = TaskBatch(tasks.x_support, tasks.y_support, tasks.x_support, tasks.y_support)
        found["support_loss_by_inner_steps"] = {
            str(k): learner.evaluate(support, inner_steps=k)["loss"].mean().item()
            for k in range(max_steps + 1)
        }
        lrs = {n: lr.detach().mean().item() for n, lr in learner.inner_lrs.items()}
        found["inner_lrs"] = lrs
        found["support_hessian"] = _mean_ends(learner, tasks, scaled=False)
        found["inner_curvature"] = _mean_ends(learner, tasks, scaled=True)
    return found


def _mean_ends(learner: MAML, tasks: TaskBatch, scaled: bool) -> dict[str, float]:
    """``MAML.inner_curvature``'s two ends, averaged over the tasks (split over torchrun's
    ranks)."""
    ends = sharded_map(
        lambda i: learner.inner_curvature(*tasks.task(i)[:2], scaled=scaled), tasks.num_tasks
    )
    return {
        "smallest": sum(e[0] for e in ends) / len(ends),
        "largest": sum(e[1] for e in ends) / len(ends),
    }


class FewShot(Experiment):
    """Table 3: Conv-4 learners on augmented few-shot episodes."""

    name = "few_shot"
    presets = FEW_SHOT["omniglot"]
    default_preset = "cpu"
    metric = ACCURACY
    proposed = "msr"
    figure = "symmetry.png"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--dataset", choices=DATASETS, default="omniglot", help="the data set")
        parser.add_argument(
            "--data",
            type=Path,
            help="data path (Omniglot: the .npz or the standard folders, default: found by "
            "the data rule, $MSR_DATA, then ~/.cache/msr, see `python -m msr.data.omniglot "
            "where`; mini-ImageNet: its root; folder: the folder holding train/, val/, test/)",
        )
        parser.add_argument(
            "--methods", "--method", nargs="+", choices=METHODS, required=True, help="the learners"
        )
        parser.add_argument(
            "--ways", nargs="+", type=positive_int, default=[5], help="classes per episode"
        )
        parser.add_argument(
            "--shots", nargs="+", type=positive_int, default=[1], help="support images per class"
        )
        parser.add_argument(
            "--test-inner-steps",
            nargs="+",
            type=positive_int,
            help="the grid of test-time inner step counts each MAML-family job is scored at on "
            "validation episodes (tested once, at its best); default: the preset's (1 3 5 10)",
        )
        parser.add_argument(
            "--augment",
            choices=AUGMENT,
            help="the meta-training query sets: augmented (queries, the paper's and the "
            "presets') or not (none, an ablation); validation and test episodes are augmented "
            "either way, so accuracies stay comparable",
        )

    def config(self, args: argparse.Namespace) -> FewShotConfig:
        if args.data is None and args.dataset != "omniglot":
            raise ValueError(f"--data is required for {args.dataset} (the standard layout's root)")
        if args.preset not in FEW_SHOT[args.dataset]:
            raise ValueError(
                f"--preset {args.preset} is not defined for {args.dataset}; its presets: "
                f"{', '.join(FEW_SHOT[args.dataset])}"
            )
        grid = args.test_inner_steps
        if grid is not None and len(set(grid)) != len(grid):
            raise ValueError(f"--test-inner-steps must differ, got {grid}")
        cfg = FEW_SHOT[args.dataset][args.preset]
        if args.test_inner_steps is not None:
            cfg = replace(cfg, test_inner_steps=tuple(args.test_inner_steps))
        if args.augment is not None:
            cfg = replace(cfg, augment=args.augment)
        return cfg

    def check(  # type: ignore[override]
        self, args: argparse.Namespace, cfg: FewShotConfig, device: torch.device
    ) -> dict[str, str]:
        """Find and load the data, check that it holds episodes of every job's shape; its
        path and fingerprint (with the Omniglot .npz's class lists)."""
        if args.data is None:  # Omniglot by the data rule
            try:
                args.data = find_omniglot(data_roots_beside_checkout())
            except FileNotFoundError as error:
                raise RunError(f"{error}; or pass --data") from None
        for name, classes in zip(
            ("train", "val", "test"), self._splits(args, cfg, device), strict=True
        ):
            for ways in args.ways:
                for shots in args.shots:
                    try:
                        check_episodes(classes, ways, shots, cfg.queries)
                    except ValueError as error:
                        raise RunError(f"{name} split of {args.data}: {error}") from None
        data = Path(args.data)
        lists = data.parent / "splits" / "vinyals"  # the Omniglot .npz's class lists
        extra = [lists / f"{s}.txt" for s in ("train", "val", "test")] if data.is_file() else []
        return {"path": str(data.resolve()), "sha256": fingerprint(data, *extra)}

    def _splits(
        self, args: argparse.Namespace, cfg: FewShotConfig, device: torch.device
    ) -> tuple[ImageClasses, ...]:
        return load_splits(args.dataset, Path(args.data), cfg.image_size, device)

    def jobs(self, args: argparse.Namespace) -> list[Tags]:
        return [
            {"method": method, "dataset": args.dataset, "ways": ways, "shots": shots}
            for ways in args.ways
            for shots in args.shots
            for method in args.methods
        ]

    def job_name(self, tags: Tags) -> str:
        return f"{tags['method']}_{tags['dataset']}_{tags['ways']}w{tags['shots']}s_s{tags['seed']}"

    def plan(
        self, tags: Tags, cfg: FewShotConfig, args: argparse.Namespace | None, device: torch.device
    ) -> Plan:  # type: ignore[override]
        method, ways, shots = tags["method"], tags["ways"], tags["shots"]
        # no data when redrawing a figure (args is None): the learner alone, from the tags
        train, val, test = (None,) * 3 if args is None else self._splits(args, cfg, device)
        channels = CHANNELS[tags["dataset"]] if train is None else train.image_shape[0]
        learner = build_learner(method, channels, ways, cfg).to(device)

        def episodes(
            classes: ImageClasses, count: int, generator: torch.Generator, augment: bool = True
        ) -> Any:
            transform = augment_images if augment else None
            return sample_episodes(classes, count, ways, shots, cfg.queries, generator, transform)

        def score(
            classes: ImageClasses, count: int, inner_steps: int | None = None
        ) -> torch.Tensor:
            """Per-task query accuracy (%) over ``count`` episodes (the same ones for every
            method and step count of a seed), adapting for ``inner_steps`` (default: the
            training's), in chunks to bound memory; under torchrun each chunk's episodes are
            split over the ranks."""
            generator, scores = torch.Generator(device=device).manual_seed(tags["seed"]), []
            chunk = cfg.eval_chunk
            steps = {} if inner_steps is None else {"inner_steps": inner_steps}
            for start in range(0, count, chunk):
                raise_if_stopped(device)  # every rank at the same chunk
                tasks = episodes(classes, min(chunk, count - start), generator)
                metrics = sharded_evaluate(
                    learner, tasks, {"accuracy": accuracy}, chunk_size=chunk, **steps
                )
                scores.append(metrics["accuracy"])
            return 100.0 * torch.cat(scores)

        def result() -> dict[str, Any]:
            curve, inner_steps = None, None
            if isinstance(learner, MAML):  # test-time steps chosen on validation episodes
                curve = {
                    str(k): score(val, cfg.selection_tasks, k).mean().item()
                    for k in sorted(cfg.test_inner_steps)
                }
                inner_steps = int(max(curve, key=lambda k: (curve[k], -int(k))))
                learner.test_inner_steps = inner_steps  # the model file's default from now on
            per_episode = score(test, cfg.test_tasks, inner_steps)
            mean, ci95 = mean_ci95(per_episode)
            held_out = episodes(
                test, cfg.analysis_tasks, torch.Generator(device=device).manual_seed(tags["seed"])
            )
            found = analyze(learner, held_out, inner_steps, max(cfg.test_inner_steps))
            if method == "msr":
                found["factor_singular_values"] = factor_singular_values(learner.model)
            paper = PAPER_TABLE3[method].get((tags["dataset"], ways, shots), (None, None))
            return {
                "accuracy": mean,
                "ci95": ci95,
                "test_tasks": cfg.test_tasks,
                # the same episodes for every method of a seed: paired comparisons need them
                "test_accuracy_by_episode": [round(a, 4) for a in per_episode.tolist()],
                "train_inner_steps": None if curve is None else cfg.inner_steps,
                "test_inner_steps": inner_steps,
                "val_accuracy_by_inner_steps": curve,
                "paper_accuracy": paper[0],
                "paper_ci95": paper[1],
                "chance": 100.0 / ways,
                "parameters": count_parameters(learner),
                "analysis": found,
            }

        def draw(entry: dict[str, Any]) -> Any:
            """Each transform's equivariance error per conv block of the adapted network."""
            symmetry = entry["analysis"]["image_symmetry"]
            return plot_curves(
                {name: dict(enumerate(row["blocks"], 1)) for name, row in symmetry.items()},
                "conv block",
                "equivariance error of its output",
                f"{self.job_name(tags)}: adapted network on {entry['analysis']['episodes']} "
                f"test episodes (accuracy {entry['accuracy']:.1f}%)",
            )

        return Plan(
            learner,
            lambda generator: episodes(train, cfg.meta_batch, generator, cfg.augment == "queries"),
            # a fraction, as evaluate's accuracy (results and tables give percentages)
            lambda: {"val_accuracy": score(val, cfg.val_tasks).mean().item() / 100},
            result,
            draw,
            stream_device=device,
        )

    def _validation_curves(
        self, out: Path, runs: list[dict[str, Any]]
    ) -> dict[str, dict[float, float]]:
        """{job label: {step: validation accuracy (%)}} from the jobs' metrics.jsonl (which
        hold fractions)."""
        return {
            _label(run): {
                record["step"]: 100 * record["val_accuracy"]
                for record in read_records(out / self.job_name(run) / "metrics.jsonl")
                if "val_accuracy" in record
            }
            for run in runs
        }

    def report(self, results: dict[str, Any], args: argparse.Namespace) -> list[str]:
        """The accuracy table, the validation accuracy at each test-time step count (and its
        figure, curve_inner_steps.png); the validation accuracy during training of every job
        (its metrics.jsonl) is drawn in curve_validation.png."""
        training = self._validation_curves(args.out, results["runs"])
        if training:
            figure = plot_curves(
                training,
                "outer step",
                f"validation accuracy (%), {results['config']['val_tasks']} episodes",
                f"{results['preset']} preset: validation accuracy during training",
            )
            save_figure(figure, args.out / "curve_validation.png")
        lines = []
        if results["config"].get("augment") == "none":
            lines += ["Meta-training query sets not augmented (--augment none).", ""]
        lines += [
            "| method | data | ways | shots | seed | accuracy ± 95% CI | test-time inner steps "
            "| paper | chance | meta-parameters |",
            "| --- " * 10 + "|",
        ]
        for r in results["runs"]:
            steps = "—" if r["test_inner_steps"] is None else r["test_inner_steps"]
            paper = (
                "—"
                if r["paper_accuracy"] is None
                else f"{r['paper_accuracy']:.1f} ± {r['paper_ci95']:.1f}"
            )
            lines.append(
                f"| {r['method']} | Aug-{r['dataset']} | {r['ways']} | {r['shots']} | {r['seed']} "
                f"| {r['accuracy']:.1f} ± {r['ci95']:.1f} | {steps} "
                f"| {paper} | {r['chance']:.0f} | {r['parameters']:,} |"
            )
        lines += [
            "",
            "The adapted networks on held-out test episodes: per transform the logits'"
            " invariance error (predictions kept); the ends of the support-loss Hessian's"
            " spectrum in the fast parameters, plain and lr-scaled (one step is stable below 2)"
            " and support loss before -> after one step:",
            "",
        ]
        lines += [_analysis_line(r) for r in results["runs"] if r.get("analysis")]
        curves = {
            _label(r): curve for r in results["runs"] if (curve := r["val_accuracy_by_inner_steps"])
        }
        if not curves:
            return lines
        grid = sorted({int(k) for curve in curves.values() for k in curve})
        lines += [
            "",
            "Validation accuracy (%) by test-time inner steps (chooses each job's count):",
            "",
            "| job | " + " | ".join(f"{k} steps" for k in grid) + " |",
            "| --- " * (len(grid) + 1) + "|",
        ]
        for label, curve in curves.items():
            cells = [f"{curve[str(k)]:.1f}" if str(k) in curve else "" for k in grid]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        figure = plot_curves(
            {label: {int(k): v for k, v in curve.items()} for label, curve in curves.items()},
            "inner steps at test time",
            "validation accuracy (%)",
            f"{results['preset']} preset: validation accuracy by test-time inner steps",
        )
        save_figure(figure, args.out / "curve_inner_steps.png")
        return lines


def _label(run: dict[str, Any]) -> str:
    return f"{run['method']} {run['ways']}w{run['shots']}s s{run['seed']}"


def _analysis_line(run: dict[str, Any]) -> str:
    found = run["analysis"]
    line = f"{_label(run)}: " + ", ".join(
        f"{name} {row['logits']:.3f} ({100 * row['agreement']:.0f}%)"
        for name, row in found["image_symmetry"].items()
    )
    if "support_hessian" in found:
        losses, hessian = found["support_loss_by_inner_steps"], found["support_hessian"]
        line += f"; Hessian {hessian['smallest']:.2f} .. {hessian['largest']:.2f}"
        ends = found["inner_curvature"]
        line += f", lr-scaled {ends['smallest']:.2f} .. {ends['largest']:.2f}"
        line += f", support loss {losses['0']:.3f} -> {losses['1']:.3f}"
    return line


EXPERIMENT = FewShot()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return cli.main(EXPERIMENT, argv)


if __name__ == "__main__":
    run_cli(main, "experiments.few_shot")
