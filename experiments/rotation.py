"""Table 2 of the MSR paper: meta-learning rotation (C8) and rotation+flip (D8) equivariance.

    python -m experiments.rotation --preset quick|paper [--group c8 d8] [--protocols paper swept]
        [--seed S] --out DIR

Data (``synthetic/rotation2d.py``): ``c8`` / ``d8`` are the paper's tasks (e2cnn's band-limited
steerable filters, 3 regular fields); ``c4`` / ``d4`` are the exact-grid variant (free 3x3
filters copied exactly at each quarter turn / flip). Each method is one ``MSRConv2d``:
- MSR-Conv: the paper's layer, U = U_out (x) U_in (x) U_kernel learned (identity init);
- MSR-Conv-dense (ours): a dense learned U (numel(W) x free parameters, N(0, 0.01^2) init), the
  MSR-FC of a conv kernel, which can express group-convolution sharing exactly;
- MAML-Conv: U frozen at the identity (a plain conv).
Two protocols, side by side: ``paper`` starts every learned inner lr at 0.1 (the paper's);
``swept`` (formerly ``level``) starts each method's at the value a small sweep picks (short runs
from each candidate, scored on *training* tasks; the choice and every score go to results.json).
Writes (through ``experiments.run``) DIR/results.json and a folder per job,
DIR/<method>_<group>_<protocol>_s<seed>/ (model.pt, metrics.jsonl, result.json and, for every
learned U, U.png: span(U)'s strongest directions as kernels), and prints Markdown tables
beside the paper's and the authors'-code numbers, with symmetry scores of every learned U.
"""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from experiments import cli
from experiments.cli import renamed
from experiments.control import run_cli
from experiments.presets import ROTATION, RotationConfig
from experiments.report import tables_per_seed
from experiments.run import (
    Experiment,
    Plan,
    Tags,
    build_maml,
    outer_optimizer,
    training,
)
from msr import MSRConv2d, NonFiniteLossError, TaskBatch, viz
from msr.distributed import sharded_evaluate
from msr.equivariance import adapted_group_equivariance_error
from msr.stats import mean_ci95
from synthetic.rotation2d import ExactGrid2D, LiftingConvTasks, Steerable2D

METHODS = ("MAML-Conv", "MSR-Conv", "MSR-Conv-dense")
LEARNED_U = ("MSR-Conv", "MSR-Conv-dense")
STEERABLE_GROUPS = ("c8", "d8")  # the paper's data
GRID_GROUPS = ("c4", "d4")  # the exact-grid variant
GROUPS = STEERABLE_GROUPS + GRID_GROUPS
PROTOCOLS = ("paper", "swept")
NUM_TASKS = {"c8": 10_000, "d8": 2_000, "c4": 10_000, "d4": 2_000}  # as in the paper's data
# The paper's Table 2 (meta-test MSE on C8 / D8; it gives no intervals).
PAPER_TABLE2 = {"MAML-Conv": {"c8": 0.504, "d8": 0.507}, "MSR-Conv": {"c8": 0.004, "d8": 0.001}}
# The authors' own code (AllanYangZhou/metalearning-symmetries) on the same data, run here, seed 0:
# (protocol, method, group) -> (MSE, 95% CI); for "swept" their code started MAML-Conv at 10
# (C8) / 25 (D8) and MSR-Conv at 10 / 20, chosen by hand.
AUTHORS_CODE = {
    ("paper", "MAML-Conv", "c8"): (0.534, 0.021),
    ("paper", "MSR-Conv", "c8"): (0.0058, 0.0004),
    ("paper", "MAML-Conv", "d8"): (0.518, 0.023),
    ("paper", "MSR-Conv", "d8"): (0.0055, 0.0004),
    ("swept", "MAML-Conv", "c8"): (0.0124, 0.0010),
    ("swept", "MSR-Conv", "c8"): (0.0060, 0.0005),
    ("swept", "MAML-Conv", "d8"): (0.0066, 0.0005),
    ("swept", "MSR-Conv", "d8"): (0.0052, 0.0004),
}
EQUIVARIANCE_TASKS = 8


@functools.lru_cache(maxsize=4)  # a job, and each of its sweep's candidates, use the same
def make_data(group: str, seed: int, device: torch.device | str = "cpu") -> LiftingConvTasks:
    """The paper's steerable tasks for c8 / d8, the exact-grid variant for c4 / d4."""
    if group not in GROUPS:
        raise ValueError(f"unknown group {group!r}; expected one of {GROUPS}")
    family = Steerable2D if group in STEERABLE_GROUPS else ExactGrid2D
    return family(group_name=group, seed=seed, num_tasks=NUM_TASKS[group], device=device)


def build_model(method: str, data: LiftingConvTasks) -> MSRConv2d:
    """One bias-free 1 -> filters*|G| channel 3x3 conv (see the module docstring)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    channels, kernel = data.out_channels, data.kernel_size
    if method == "MSR-Conv-dense":
        numel, latent = data.basis.shape
        U = torch.randn(numel, latent, device="cpu") * 0.01  # the same init on every device
        layer = MSRConv2d.from_basis(U, 1, channels, kernel, learn_U=True, bias=False)
    else:
        layer = MSRConv2d(1, channels, kernel, bias=False, learn_U=method == "MSR-Conv")
    return layer.to(data.device)


def sweep_inner_lr(
    build: Callable[[float], Plan],
    cfg: RotationConfig,
    scored: TaskBatch,
    seed: int,
    advance: Callable[[int], None] = lambda steps: None,
) -> tuple[float, dict[str, float | None]]:
    """Choose the initial inner lr among ``cfg.lr_candidates``: meta-train ``build(lr)`` for
    ``cfg.sweep_steps`` outer steps from ``seed`` per candidate and score its mean query loss on
    ``scored`` (*training* tasks, never test tasks). A candidate that diverges scores ``None``.

    Returns (the best candidate, {candidate: score}).
    """
    candidates, steps = cfg.lr_candidates, cfg.sweep_steps
    if not candidates:
        raise ValueError("the inner-lr sweep needs at least one candidate")
    scores: dict[str, float | None] = {}
    for lr in candidates:
        torch.manual_seed(seed)
        plan, completed, short = build(lr), 0, replace(cfg, steps=steps, inner_lr=lr)
        try:
            for _ in training(plan, short, seed, outer_optimizer(plan.learner, short)):
                completed += 1
                advance(1)
            score = sharded_evaluate(plan.learner, scored)["loss"].mean().item()
        except NonFiniteLossError:  # in training, or in scoring
            score = math.nan
            advance(steps - completed)  # the progress bar counts the steps it skips
        scores[str(lr)] = score if math.isfinite(score) else None
    finite = [lr for lr in candidates if scores[str(lr)] is not None]
    if not finite:
        raise NonFiniteLossError(f"every inner-lr candidate diverged: {scores}", torch.empty(0))
    return min(finite, key=lambda lr: scores[str(lr)]), scores


class Rotation(Experiment):
    """Table 2: one lifting convolution per method, on C8 / D8 (or C4 / D4) tasks."""

    name = "rotation"
    presets = ROTATION
    proposed = "MSR-Conv"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--group",
            nargs="+",
            choices=GROUPS,
            default=list(STEERABLE_GROUPS),
            help="c8 / d8: the paper's steerable data; c4 / d4: the exact-grid variant",
        )
        parser.add_argument(
            "--methods", nargs="+", choices=METHODS, default=list(METHODS), help="the learners"
        )
        parser.add_argument(
            "--protocols",
            nargs="+",
            type=renamed("level", "swept", "--protocols"),
            choices=PROTOCOLS,
            default=list(PROTOCOLS),
            help="paper: the paper's inner lr; swept: the inner lr swept on training tasks",
        )

    def jobs(self, args: argparse.Namespace) -> list[Tags]:
        return [
            {"method": method, "group": group, "protocol": protocol}
            for group in args.group
            for protocol in args.protocols
            for method in args.methods
        ]

    def tuning_steps(self, tags: Tags, cfg: RotationConfig) -> int:  # type: ignore[override]
        return len(cfg.lr_candidates) * cfg.sweep_steps if tags["protocol"] == "swept" else 0

    def tune(  # type: ignore[override]
        self,
        tags: Tags,
        cfg: RotationConfig,
        device: torch.device,
        advance: Callable[[int], None],
    ) -> tuple[RotationConfig, dict[str, Any]]:
        """The swept protocol's initial inner lr (the sweep's scores, and whether its best lies
        at the end of the grid: a wider grid might do better still)."""
        if tags["protocol"] != "swept":
            return cfg, {"inner_lr_init": cfg.inner_lr}
        data = make_data(tags["group"], tags["seed"], device)
        if not 0 < cfg.sweep_tasks <= data.num_train_tasks:
            raise ValueError(f"sweep_tasks must be in [1, {data.num_train_tasks}] (training tasks)")
        scored = data.tasks(torch.arange(cfg.sweep_tasks))[0]
        inner_lr, scores = sweep_inner_lr(
            lambda lr: self.plan(tags, replace(cfg, inner_lr=lr), None, device),
            cfg,
            scored,
            tags["seed"],
            advance,
        )
        notes = {"inner_lr_sweep": scores, "inner_lr_init": inner_lr}
        notes["inner_lr_at_grid_edge"] = inner_lr in (
            min(cfg.lr_candidates),
            max(cfg.lr_candidates),
        )
        return replace(cfg, inner_lr=inner_lr), notes

    def plan(  # type: ignore[override]
        self,
        tags: Tags,
        cfg: RotationConfig,
        args: argparse.Namespace | None,
        device: torch.device,
    ) -> Plan:
        method, group = tags["method"], tags["group"]
        data = make_data(group, tags["seed"], device)
        test, _ = data.tasks(data.test_indices(cfg.test_tasks))
        maml = build_maml(build_model(method, data), cfg)

        def probe() -> dict[str, float]:
            mse, ci95 = mean_ci95(sharded_evaluate(maml, test)["loss"])
            return {"test_mse": mse, "test_ci95": ci95}

        def result() -> dict[str, Any]:
            scores = probe()
            authors = AUTHORS_CODE.get((tags["protocol"], method, group), (None, None))
            entry: dict[str, Any] = {
                "data": "steerable" if group in STEERABLE_GROUPS else "exact-grid",
                "inner_lr_final": {k: v.item() for k, v in maml.inner_lrs.items()},
                "mse": scores["test_mse"],
                "ci95": scores["test_ci95"],
                "paper_mse": PAPER_TABLE2.get(method, {}).get(group),
                "authors_code_mse": authors[0],
                "authors_code_ci95": authors[1],
                "equivariance_error": adapted_group_equivariance_error(
                    maml.adapted_model, test, data.group, EQUIVARIANCE_TASKS
                ),
            }
            if method in LEARNED_U:
                entry["symmetry"] = data.recovery_scores(maml.model.sharing_matrix().detach())
            return entry

        def draw(entry: dict[str, Any]) -> Any:
            """span(U)'s 3 strongest directions, each a kernel shown as the filters of the
            first field's channels (a group convolution turns one filter across them)."""
            if method not in LEARNED_U:
                return None
            layer = maml.model
            return viz.plot_conv_directions(
                layer.sharing_matrix().detach(),
                (layer.out_channels, layer.in_channels, *layer.kernel_size),
                title=f"{self.job_name(tags)}: strongest directions of span(U), channels of "
                f"field 0 (meta-test MSE {entry['mse']:.4f})",
                channels=data.group.order,
            )

        train_tasks = functools.partial(data.sample_train, cfg.meta_batch)
        return Plan(maml, train_tasks, probe, result, draw)

    def report(self, results: dict[str, Any], args: argparse.Namespace) -> list[str]:
        return tables_per_seed(results["runs"], args.seeds, markdown_tables)


def markdown_tables(runs: Sequence[dict[str, Any]]) -> str:
    """The MSE table (protocols side by side) and the symmetry-score table."""
    lines = [
        "| group | method | paper protocol: MSE ± 95% CI | swept inner lr: MSE ± 95% CI "
        "(initial inner lr) | paper | authors' code (paper / swept) | equivariance error "
        "(paper / swept) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    cells = {(r["group"], r["method"], r["protocol"]): r for r in runs}
    groups = [g for g in GROUPS if any(r["group"] == g for r in runs)]
    for group in groups:
        for method in METHODS:
            paper, swept = cells.get((group, method, "paper")), cells.get((group, method, "swept"))
            if paper is None and swept is None:
                continue
            reference = (paper or swept)["paper_mse"]
            swept_lr = "" if swept is None else f" ({swept['inner_lr_init']:g}{_edge(swept)})"
            lines.append(
                f"| {_group_label(group)} | {method} | {_mse(paper)} | {_mse(swept)}{swept_lr} | "
                f"{'—' if reference is None else f'{reference:.3f}'} | "
                f"{_authors(paper)} / {_authors(swept)} | "
                f"{_equivariance(paper)} / {_equivariance(swept)} |"
            )
    lines += [
        "",
        "| group | method | protocol | energy in group basis (chance) | largest angle | "
        "filter energy in band limit (chance) | filter singular values | group discovered "
        "(nearest, distance) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        if (s := r.get("symmetry")) is None:
            continue
        angle = s["max_principal_angle_deg"]
        nearest, found = s["nearest_group"], s["discovered_group"]
        lines.append(
            f"| {_group_label(r['group'])} | {r['method']} | {r['protocol']} | "
            f"{s['energy_in_group_basis']:.3f} ({s['chance_energy']:.3f}) | "
            f"{'n/a (U is square)' if angle is None else f'{angle:.1f}°'} | "
            f"{s['kernel_energy_in_band_limit']:.3f} ({s['chance_kernel_energy']:.3f}) | "
            f"{' '.join(f'{v:.2f}' for v in s['kernel_singular_values'])} | "
            f"{'none' if found is None else found.upper()} "
            f"({nearest.upper()}, {s['group_distances_deg'][nearest]:.0f}°) |"
        )
    return "\n".join(lines)


def _edge(run: dict[str, Any]) -> str:
    return ", grid edge" if run.get("inner_lr_at_grid_edge") else ""


def _group_label(group: str) -> str:
    return group.upper() + (" (exact grid)" if group in GRID_GROUPS else "")


def _mse(run: dict[str, Any] | None) -> str:
    return "—" if run is None else f"{run['mse']:.4f} ± {run['ci95']:.4f}"


def _authors(run: dict[str, Any] | None) -> str:
    if run is None or run["authors_code_mse"] is None:
        return "—"
    return f"{run['authors_code_mse']:.4f} ± {run['authors_code_ci95']:.4f}"


def _equivariance(run: dict[str, Any] | None) -> str:
    return "—" if run is None else f"{run['equivariance_error']:.1e}"


EXPERIMENT = Rotation()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return cli.main(EXPERIMENT, argv)


if __name__ == "__main__":
    run_cli(main, "experiments.rotation")
