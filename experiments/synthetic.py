"""Table 1 of the MSR paper: meta-learning 1-D translation symmetry, full (k=1) and partial (k>1).

    python -m experiments.synthetic --preset quick|paper [--methods ...] [--k ...] [--seed S] \
        --out DIR

Trains each (method, k) with second-order MAML on the same streamed tasks, evaluates on 300 fixed
held-out tasks, and writes DIR/metrics.jsonl (as it goes), DIR/results.json,
DIR/model_<method>_k<k>.pt (what each run learned) and DIR/U_<method>_k<k>.png (the learned
sharing pattern and the adapted weight of a test task; ``python -m experiments.redraw DIR``
redraws them from the model files), then prints a Markdown table beside the paper's numbers.
Data, models and protocol: ``shared/reference/msr_facts.md``.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from experiments.common import (
    DefaultsHelpFormatter,
    MetricsLog,
    keep_freed_memory,
    save_figure,
    save_model,
    write_results,
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
)
from msr import MAML, MSRLinear, TaskBatch, bases, viz
from msr.symmetry import (
    adapted_translation_equivariance_error,
    orthonormal_basis,
    recovery_scores,
)
from synthetic.translation1d import RANKS, Translation1D

METHODS = ("MAML-FC", "MAML-LC", "MAML-Conv", "MSR-FC")
# Not a method: MSR-FC whose U starts at the generator's own basis (orthonormal, latent = its
# rank), then trains like MSR-FC. Its MSE estimates the floor this protocol (one inner SGD step)
# can reach on a data draw, so MSR-FC can be judged against what is attainable. Opt-in.
ORACLE = "MSR-FC-oracle"
CHOICES = (*METHODS, ORACLE)
LEARNED_U = ("MSR-FC", ORACLE)
LATENT = {1: 3, 2: 6, 5: 30}  # MSR-FC latent size per k (the paper's)

# The paper's Table 1: meta-test MSE and 95% CI half-width, per method and k (for comparison).
PAPER_TABLE1: dict[str, dict[int, tuple[float, float]]] = {
    "MAML-FC": {1: (3.2, 0.29), 2: (2.1, 0.15), 5: (0.89, 0.05)},
    "MAML-LC": {1: (2.4, 0.23), 2: (1.6, 0.11), 5: (0.81, 0.05)},
    "MAML-Conv": {1: (0.16, 0.02), 2: (0.52, 0.05), 5: (0.44, 0.02)},
    "MSR-FC": {1: (0.18, 0.03), 2: (0.21, 0.02), 5: (0.22, 0.01)},
}


PRESETS = {
    # the paper's protocol, run long enough to converge (1,000 steps is not), lr annealed at the end
    "paper": TrainConfig(steps=8000, eval_every=500, final_lr_fraction=0.01),
    # the README's main job: the same protocol, shorter
    "quick": TrainConfig(steps=1500, eval_every=500),
    # for the end-to-end test only
    "tiny": TrainConfig(steps=6, eval_every=3, test_tasks=10, meta_batch=4),
}


def build_model(method: str, k: int, data: Translation1D) -> nn.Module:
    """The single 70->68 layer of each method (bias-free); the baselines are frozen-U MSRLinear."""
    n_in, n_out = data.in_length, data.out_length
    if method == "MAML-FC":
        return MSRLinear.fully_connected(n_in, n_out)
    if method == "MAML-LC":
        return MSRLinear.from_basis(bases.locally_connected1d(n_in, data.kernel_size), n_in, n_out)
    if method == "MAML-Conv":
        return MSRLinear.from_basis(bases.conv1d(n_in, data.kernel_size), n_in, n_out)
    if method == "MSR-FC":
        return MSRLinear(n_in, n_out, LATENT[k], bias=False)
    if method == ORACLE:
        return MSRLinear.from_basis(orthonormal_basis(data.true_basis()), n_in, n_out, learn_U=True)
    raise ValueError(f"unknown method {method!r}; expected one of {CHOICES}")


def symmetry_scores(
    layer: MSRLinear, maml: MAML, data: Translation1D, test: TaskBatch
) -> dict[str, float]:
    """How well span(U) recovers the generator's sharing basis, and how equivariant W is."""
    return {
        **recovery_scores(layer.U, data.true_basis()),
        "translation_equivariance_error": adapted_translation_equivariance_error(maml.adapt, test),
    }


def run_one(
    method: str,
    k: int,
    cfg: TrainConfig,
    seed: int,
    out: Path,
    device: torch.device,
    log: MetricsLog,
    advance: Callable[[int], None],
) -> dict[str, Any]:
    """Meta-train one method on one data set on ``device``; return its results.json entry."""
    torch.manual_seed(seed)
    data = Translation1D(k, seed=seed, device=device)
    test, test_coefficients = data.tasks(data.test_indices(cfg.test_tasks), support=cfg.support)
    maml = build_maml(build_model(method, k, data).to(device), cfg)
    tags = {"method": method, "k": k, "seed": seed}
    mse, ci95, wall = meta_train(maml, data, test, cfg, seed, log, advance, **tags)
    paper_mse, paper_ci95 = PAPER_TABLE1.get(method, {}).get(k, (None, None))
    entry: dict[str, Any] = {
        **tags,
        "mse": mse,
        "ci95": ci95,
        "paper_mse": paper_mse,
        "paper_ci95": paper_ci95,
        "steps": cfg.steps,
        "wall_s": wall,
        "device": str(device),
    }
    if method in LEARNED_U:
        entry["symmetry"] = symmetry_scores(maml.model, maml, data, test)
    save_model(out / f"model_{_name(entry)}.pt", maml, "synthetic", seed, tags, cfg)
    draw_figure(maml, entry, data, test, test_coefficients, out)
    return entry


def draw_figure(
    maml: MAML,
    entry: dict[str, Any],
    data: Translation1D,
    test: TaskBatch,
    test_coefficients: torch.Tensor,
    out: Path,
) -> Path:
    """DIR/U_<method>_k<k>_s<seed>.png: span(U)'s strongest directions, the weight adapted to
    the first test task and that task's true weight."""
    method, k = entry["method"], entry["k"]
    figure = viz.plot_sharing(
        maml.model.U if method in LEARNED_U else None,
        adapted_weight=maml.adapt(test.x_support[0], test.y_support[0]).weight,
        true_weight=data.weights(test_coefficients[0]),
        title=f"{method}, k={k}: meta-test MSE {entry['mse']:.3f} ± {entry['ci95']:.3f}",
    )
    return save_figure(figure, out / f"U_{_name(entry)}.png")


def _name(entry: dict[str, Any]) -> str:
    return f"{entry['method']}_k{entry['k']}_s{entry['seed']}"


def redraw(saved: dict[str, Any], entry: dict[str, Any], out: Path) -> Path:
    """Redraw a finished run's figure from its model file (``experiments.redraw``)."""
    method, k = saved["tags"]["method"], saved["tags"]["k"]
    cfg = TrainConfig(**saved["config"])
    data = Translation1D(k, seed=saved["seed"])
    maml = build_maml(build_model(method, k, data), cfg)
    maml.load_state_dict(saved["state_dict"])
    test, test_coefficients = data.tasks(data.test_indices(cfg.test_tasks), support=cfg.support)
    return draw_figure(maml, entry, data, test, test_coefficients, out)


def markdown_table(runs: Sequence[dict[str, Any]]) -> str:
    """Rows = methods, columns = k; each cell 'ours ± ci (paper ± ci)'."""
    ks = sorted({r["k"] for r in runs})
    methods = [m for m in CHOICES if any(r["method"] == m for r in runs)]
    cells = {(r["method"], r["k"]): r for r in runs}
    lines = [
        "| method | " + " | ".join(f"k={k} (paper)" for k in ks) + " |",
        "| --- |" + " --- |" * len(ks),
    ]
    for method in methods:
        row = []
        for k in ks:
            r = cells.get((method, k))
            row.append("" if r is None else _cell(r))
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _cell(run: dict[str, Any]) -> str:
    ours = f"{run['mse']:.3f} ± {run['ci95']:.3f}"
    if run["paper_mse"] is None:
        return f"{ours} (—)"
    return f"{ours} ({run['paper_mse']:.2f} ± {run['paper_ci95']:.2f})"


def oracle_floor(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per k and seed where both ran: MSR-FC's MSE, the MSR-FC-oracle's (the floor this
    protocol reaches on that data draw) and MSR-FC's excess over it."""
    mse = {(r["method"], r["k"], r["seed"]): r["mse"] for r in runs}
    return [
        {"k": k, "seed": seed, "msr_fc": value, "floor": floor, "above_floor": value - floor}
        for (method, k, seed), value in mse.items()
        if method == "MSR-FC" and (floor := mse.get((ORACLE, k, seed))) is not None
    ]


def floor_lines(floors: Sequence[dict[str, Any]]) -> list[str]:
    return [
        f"MSR-FC k={f['k']} seed {f['seed']}: {f['msr_fc']:.3f} vs oracle floor {f['floor']:.3f} "
        f"({f['above_floor']:+.3f})"
        for f in floors
    ]


def recovery_lines(runs: Sequence[dict[str, Any]]) -> list[str]:
    return [
        f"{r['method']} k={r['k']} seed {r['seed']}: largest principal angle "
        f"{s['max_principal_angle_deg']:.1f}°, recall {s['recall']:.3f} "
        f"(chance {s['chance_recall']:.4f}), translation equivariance error of adapted W "
        f"{s['translation_equivariance_error']:.2e}"
        for r in runs
        if (s := r.get("symmetry"))
    ]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=DefaultsHelpFormatter
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=CHOICES,
        default=list(METHODS),
        help=f"default: the paper's four; {ORACLE} adds the attainable-floor reference",
    )
    parser.add_argument(
        "--k", nargs="+", type=int, choices=RANKS, default=list(RANKS), help="the data sets' ranks"
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
            {"method": method, "k": k, "seed": seed},
            functools.partial(run_one, method, k, cfg, seed, args.out, device),
        )
        for seed in args.seeds
        for k in args.k
        for method in args.methods
    ]
    results = run_jobs(jobs, cfg, args, resume_from(args, cfg))
    results["oracle_floor"] = oracle_floor(results["runs"])
    write_results(args.out / "results.json", results)
    print(summary_header(cfg, args, results))
    if len(args.seeds) > 1:
        print(seed_table(results["aggregate"]))
    for seed in args.seeds:
        runs = [r for r in results["runs"] if r["seed"] == seed]
        if len(args.seeds) > 1:
            print(f"\nSeed {seed}:\n")
        print(markdown_table(runs))
    for line in recovery_lines(results["runs"]) + floor_lines(results["oracle_floor"]):
        print(line)
    print(f"\nWrote {args.out}/results.json, metrics.jsonl and U_*.png")
    return results


if __name__ == "__main__":
    run_cli(main, "experiments.synthetic")
