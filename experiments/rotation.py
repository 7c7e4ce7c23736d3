"""Table 2 of the MSR paper: meta-learning rotation (C8) and rotation+flip (D8) equivariance.

    python -m experiments.rotation --preset quick|paper [--group c8 d8] [--protocols paper level]
        [--seed S] --out DIR

Data (``synthetic/rotation2d.py``): ``c8`` / ``d8`` are the paper's tasks (e2cnn's band-limited
steerable filters, 3 regular fields); ``c4`` / ``d4`` are the exact-grid variant (free 3x3
filters copied exactly at each quarter turn / flip). Each method is one ``MSRConv2d``:
- MSR-Conv: the paper's layer, U = U_out (x) U_in (x) U_kernel learned (identity init);
- MSR-Conv-dense (ours): a dense learned U (numel(W) x free parameters, N(0, 0.01^2) init), the
  MSR-FC of a conv kernel, which can express group-convolution sharing exactly;
- MAML-Conv: U frozen at the identity (a plain conv).
Two protocols, side by side: ``paper`` starts every learned inner lr at 0.1 (the paper's);
``level`` starts each method's at the value a small sweep picks (short runs from each candidate,
scored on *training* tasks; the choice and every score go to results.json). Writes
DIR/metrics.jsonl, DIR/results.json, DIR/model_<method>_<group>_<protocol>.pt (what each run
learned), DIR/U_<method>_<group>_<protocol>.png (span(U)'s strongest directions as kernels, for
every learned U; ``python -m experiments.redraw DIR`` redraws them) and Markdown tables beside
the paper's and the authors'-code numbers, with symmetry scores of every learned U.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from experiments.common import (
    DefaultsHelpFormatter,
    MetricsLog,
    keep_freed_memory,
    save_figure,
    save_model,
)
from experiments.rundir import claim_output, run_cli
from experiments.training import (
    TrainConfig,
    add_run_arguments,
    build_maml,
    meta_train,
    resolve_config,
    resume_from,
    run_jobs,
    seed_table,
    summary_header,
    sweep_inner_lr,
)
from msr import MAML, MSRConv2d, bases, viz
from msr.symmetry import (
    adapted_group_equivariance_error,
    energy_share,
    kernel_mode_matrix,
    nearest_group,
    principal_angles,
)
from synthetic.rotation2d import ExactGrid2D, LiftingConvTasks, Steerable2D

METHODS = ("MAML-Conv", "MSR-Conv", "MSR-Conv-dense")
LEARNED_U = ("MSR-Conv", "MSR-Conv-dense")
STEERABLE_GROUPS = ("c8", "d8")  # the paper's data
GRID_GROUPS = ("c4", "d4")  # the exact-grid variant
GROUPS = STEERABLE_GROUPS + GRID_GROUPS
CANDIDATE_GROUPS = ("c4", "d4", "c8", "d8")  # "which symmetry was discovered"
# The nearest group counts as discovered when it holds at least this share of U's energy.
DISCOVERED_ENERGY = 0.9
PROTOCOLS = ("paper", "level")
NUM_TASKS = {"c8": 10_000, "d8": 2_000, "c4": 10_000, "d4": 2_000}  # as in the paper's data
# The paper's Table 2 (meta-test MSE on C8 / D8; it gives no intervals).
PAPER_TABLE2 = {"MAML-Conv": {"c8": 0.504, "d8": 0.507}, "MSR-Conv": {"c8": 0.004, "d8": 0.001}}
# The authors' own code on the same data, run here (shared/reference/msr_facts.md, seed 0):
# (protocol, method, group) -> (MSE, 95% CI); its level field started MAML-Conv at 10 (C8) / 25
# (D8) and MSR-Conv at 10 / 20, chosen by hand.
AUTHORS_CODE = {
    ("paper", "MAML-Conv", "c8"): (0.534, 0.021),
    ("paper", "MSR-Conv", "c8"): (0.0058, 0.0004),
    ("paper", "MAML-Conv", "d8"): (0.518, 0.023),
    ("paper", "MSR-Conv", "d8"): (0.0055, 0.0004),
    ("level", "MAML-Conv", "c8"): (0.0124, 0.0010),
    ("level", "MSR-Conv", "c8"): (0.0060, 0.0005),
    ("level", "MAML-Conv", "d8"): (0.0066, 0.0005),
    ("level", "MSR-Conv", "d8"): (0.0052, 0.0004),
}
EQUIVARIANCE_TASKS = 8


@dataclass(frozen=True)
class RotationConfig(TrainConfig):
    """A preset of Table 2: the training protocol plus the level field's inner-lr sweep."""

    # 0.1 * 2^k: the step that one inner step can use lies near C/2 for a plain conv here (the
    # MSE averages over C x 900 outputs), just below its stability edge; a coarser grid (x3)
    # picked 30 for D8 (C/2 = 24), over the edge, and left MAML-Conv 6x above its level
    lr_candidates: tuple[float, ...] = tuple(round(0.1 * 2**k, 1) for k in range(12))
    sweep_steps: int = 50
    sweep_tasks: int = 100


# Per-task loop, not vmap: on these conv layers it measured faster overall (sum over the three
# methods, 32 tasks, 2 threads: 350 vs 440 ms per D4 step, 2x faster D4 evaluation; C4 a tie).
PRESETS = {
    "paper": RotationConfig(steps=1000, eval_every=100, batching="loop"),
    # a preview, not the paper's protocol: 3x the outer lr, so that a few hundred steps show
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
    "tiny": RotationConfig(
        steps=4,
        eval_every=2,
        test_tasks=6,
        meta_batch=3,
        lr_candidates=(0.1, 10.0),
        sweep_steps=2,
        sweep_tasks=4,
    ),
}


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


def symmetry_scores(U: torch.Tensor, data: LiftingConvTasks) -> dict[str, Any]:
    """How far a learned U recovered the data's group convolution (docs/results.md, Table 2).

    "Which symmetry was discovered": the group among C4, D4, C8, D8 (those whose regular fields
    fit the channels) whose lifting basis, of the data's own family (``group_basis``: steerable,
    or on the exact grid C4 and D4 only), is nearest to U's strong directions by Grassmann
    distance, counted as discovered if it also holds 90% of U's energy.
    """
    numel, pixels = U.shape[0], data.kernel_size**2
    rank = data.basis.shape[1]
    band_limited = bases.steerable_lifting2d(
        data.group_name, 1, data.kernel_size, device=U.device
    ).filter_basis
    kernel_mode = kernel_mode_matrix(U, pixels)
    kernel_singular = torch.linalg.svdvals(kernel_mode)
    candidates = {
        name: basis for name in CANDIDATE_GROUPS if (basis := data.group_basis(name)) is not None
    }
    return {
        "energy_in_group_basis": energy_share(U, data.basis),
        "chance_energy": rank / numel,
        # span(U) must be narrower than the weight space for the angle to say anything
        "max_principal_angle_deg": (
            float(principal_angles(U, data.basis).max()) if U.shape[1] < numel else None
        ),
        "kernel_singular_values": (kernel_singular / kernel_singular[0]).tolist(),
        "kernel_energy_in_band_limit": energy_share(kernel_mode, band_limited),
        "chance_kernel_energy": band_limited.shape[1] / pixels,
        **nearest_group(U, candidates, DISCOVERED_ENERGY),
    }


def run_one(
    method: str,
    group: str,
    protocol: str,
    cfg: RotationConfig,
    seed: int,
    out: Path,
    device: torch.device,
    log: MetricsLog,
    advance: Callable[[int], None],
) -> dict[str, Any]:
    """Meta-train one method on one group's tasks under one protocol on ``device``; its
    results.json entry."""
    data = make_data(group, seed, device)
    test, _ = data.tasks(data.test_indices(cfg.test_tasks), support=cfg.support)
    tags = {"method": method, "group": group, "protocol": protocol, "seed": seed}
    entry: dict[str, Any] = dict(tags)

    def build(inner_lr: float) -> MAML:
        return build_maml(build_model(method, data), _with_inner_lr(cfg, inner_lr))

    inner_lr = cfg.inner_lr
    if protocol == "level":
        inner_lr, entry["inner_lr_sweep"] = sweep_inner_lr(
            build,
            data,
            cfg,
            cfg.lr_candidates,
            cfg.sweep_steps,
            cfg.sweep_tasks,
            seed,
            advance,
            **tags,
        )
        # the sweep's best at the end of its grid: a wider grid might do better still
        grid_ends = (min(cfg.lr_candidates), max(cfg.lr_candidates))
        entry["inner_lr_at_grid_edge"] = inner_lr in grid_ends
    torch.manual_seed(seed)
    maml = build(inner_lr)
    mse, ci95, wall = meta_train(
        maml, data, test, _with_inner_lr(cfg, inner_lr), seed, log, advance, **tags
    )
    authors = AUTHORS_CODE.get((protocol, method, group), (None, None))
    entry |= {
        "data": "steerable" if group in STEERABLE_GROUPS else "exact-grid",
        "inner_lr_init": inner_lr,
        "inner_lr_final": {k: v.item() for k, v in maml.inner_lrs.items()},
        "mse": mse,
        "ci95": ci95,
        "paper_mse": PAPER_TABLE2.get(method, {}).get(group),
        "authors_code_mse": authors[0],
        "authors_code_ci95": authors[1],
        "steps": cfg.steps,
        "wall_s": wall,
        "device": str(device),
        "equivariance_error": adapted_group_equivariance_error(
            maml.adapt, test, data.group, EQUIVARIANCE_TASKS
        ),
    }
    if method in LEARNED_U:
        entry["symmetry"] = symmetry_scores(maml.model.sharing_matrix().detach(), data)
    save_model(out / f"model_{_name(entry)}.pt", maml, "rotation", seed, tags, cfg)
    draw_figure(maml, entry, data, out)
    return entry


def draw_figure(
    maml: MAML, entry: dict[str, Any], data: LiftingConvTasks, out: Path
) -> Path | None:
    """DIR/U_<method>_<group>_<protocol>.png: span(U)'s 3 strongest directions, each a kernel
    shown as the filters of the first field's channels (a group convolution turns one filter
    across them); None for MAML-Conv, whose U is not learned."""
    if entry["method"] not in LEARNED_U:
        return None
    layer = maml.model
    kernel_shape = (layer.out_channels, layer.in_channels, *layer.kernel_size)
    name = _name(entry)
    figure = viz.plot_conv_directions(
        layer.sharing_matrix().detach(),
        kernel_shape,
        title=f"{name}: strongest directions of span(U), channels of field 0 "
        f"(meta-test MSE {entry['mse']:.4f})",
        channels=data.group.order,
    )
    return save_figure(figure, out / f"U_{name}.png")


def _name(entry: dict[str, Any]) -> str:
    return f"{entry['method']}_{entry['group']}_{entry['protocol']}_s{entry['seed']}"


def redraw(saved: dict[str, Any], entry: dict[str, Any], out: Path) -> Path | None:
    """Redraw a finished run's figure from its model file (``experiments.redraw``)."""
    tags = saved["tags"]
    cfg = RotationConfig(**saved["config"])
    data = make_data(tags["group"], saved["seed"])
    maml = build_maml(build_model(tags["method"], data), cfg)
    maml.load_state_dict(saved["state_dict"])
    return draw_figure(maml, entry, data, out)


def _with_inner_lr(cfg: RotationConfig, inner_lr: float) -> RotationConfig:
    return replace(cfg, inner_lr=inner_lr)


def markdown_tables(runs: Sequence[dict[str, Any]]) -> str:
    """The MSE table (protocols side by side) and the symmetry-score table."""
    lines = [
        "| group | method | paper protocol: MSE ± 95% CI | level field: MSE ± 95% CI "
        "(initial inner lr) | paper | authors' code (paper / level) | equivariance error "
        "(paper / level) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    cells = {(r["group"], r["method"], r["protocol"]): r for r in runs}
    groups = [g for g in GROUPS if any(r["group"] == g for r in runs)]
    for group in groups:
        for method in METHODS:
            paper, level = cells.get((group, method, "paper")), cells.get((group, method, "level"))
            if paper is None and level is None:
                continue
            reference = (paper or level)["paper_mse"]
            level_lr = "" if level is None else f" ({level['inner_lr_init']:g}{_edge(level)})"
            lines.append(
                f"| {_group_label(group)} | {method} | {_mse(paper)} | {_mse(level)}{level_lr} | "
                f"{'—' if reference is None else f'{reference:.3f}'} | "
                f"{_authors(paper)} / {_authors(level)} | "
                f"{_equivariance(paper)} / {_equivariance(level)} |"
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


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=DefaultsHelpFormatter
    )
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
        choices=PROTOCOLS,
        default=list(PROTOCOLS),
        help="paper: the paper's inner lr; level: the inner lr swept on training tasks",
    )
    add_run_arguments(parser, PRESETS)
    args = parser.parse_args(argv)
    keep_freed_memory()
    cfg, device = resolve_config(parser, args, PRESETS)
    with claim_output(args.out, args.resume, args.overwrite):
        return _run(args, cfg, device)


def _run(args: argparse.Namespace, cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    jobs = [
        (
            {"method": method, "group": group, "protocol": protocol, "seed": seed},
            functools.partial(run_one, method, group, protocol, cfg, seed, args.out, device),
        )
        for seed in args.seeds
        for group in args.group
        for protocol in args.protocols
        for method in args.methods
    ]
    sweep_steps = len(cfg.lr_candidates) * cfg.sweep_steps

    def job_steps(tags: dict[str, Any]) -> int:
        return cfg.steps + (sweep_steps if tags["protocol"] == "level" else 0)

    results = run_jobs(jobs, cfg, args, resume_from(args, cfg), job_steps)
    print(summary_header(cfg, args, results))
    if len(args.seeds) > 1:
        print(seed_table(results["aggregate"]))
    for seed in args.seeds:
        if len(args.seeds) > 1:
            print(f"\nSeed {seed}:\n")
        print(markdown_tables([r for r in results["runs"] if r["seed"] == seed]))
    print(f"\nWrote {Path(args.out) / 'results.json'} and metrics.jsonl")
    return results


if __name__ == "__main__":
    run_cli(main, "experiments.rotation")
