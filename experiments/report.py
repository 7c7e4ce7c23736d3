"""What the drivers report: seed aggregates and tables, curves, and whether a method's lead is
beyond seed noise (paired comparisons over the seeds of finished runs).

    python -m experiments.report DIR [DIR ...] [--method msr] [--against maml protonet] \
        [--figures FOLDER]

Reads DIR/results.json of any driver (several folders pool their seeds; a folder whose run is
still going counts the jobs it has finished). Within each column (the preset and the jobs' tags
but method and seed) it pairs ``--method``'s job with each ``--against`` method's job of the same
seed: a driver evaluates every method of a seed on the same test tasks, so the pairs share their
episodes. Printed as Markdown: the per-seed table; over seeds, the per-seed differences (positive:
``--method`` is better), their mean ± 95% t-interval, the exact sign and Wilcoxon signed-rank
p-values and a verdict (``msr.stats.PairedComparison``); where the runs keep each test task's
value (the few-shot driver's ``test_accuracy_by_episode``), the same paired test over the
episodes of each seed. ``--figures`` draws each column's per-seed values with their CIs, one
line per method.
"""

from __future__ import annotations

import argparse
import re
import statistics
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from experiments.control import RunError, run_cli
from experiments.rundir import read_results, save_figure
from msr.stats import PairedComparison, compare_paired, mean_ci95

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class Metric:
    """What a driver's jobs are scored by (``Experiment.metric``)."""

    field: str  # the results field averaged over seeds and compared
    label: str  # its name in tables and figures
    higher_is_better: bool
    digits: int  # decimals in the comparison tables, as the drivers print it
    board_scale: float = 1.0  # times the field is its TensorBoard value (% -> a fraction)


MSE = Metric("mse", "MSE", higher_is_better=False, digits=4)
ACCURACY = Metric("accuracy", "accuracy (%)", higher_is_better=True, digits=1, board_scale=0.01)
METRICS = (MSE, ACCURACY)  # the drivers' metrics: how a run folder is read without its driver


@dataclass(frozen=True)
class Column:
    """One column of a table: the jobs of one preset and tags, every method and seed."""

    preset: str
    tags: tuple[tuple[str, Any], ...]  # the jobs' tags but method and seed

    @property
    def label(self) -> str:
        return ", ".join([*(f"{k} {v}" for k, v in self.tags), f"preset {self.preset}"])


@dataclass(frozen=True)
class Pooled:
    """The runs of one or more results.json files, by column, method and seed."""

    metric: Metric
    runs: Mapping[Column, Mapping[str, Mapping[int, Mapping[str, Any]]]]


def pool_runs(sources: Sequence[tuple[str, Mapping[str, Any]]], metric: Metric) -> Pooled:
    """Every finished job of the (folder name, results.json contents) ``sources`` by column,
    method and seed; a job in two sources, or a column run with two configurations, is a
    ``RunError``."""
    runs: dict[Column, dict[str, dict[int, dict[str, Any]]]] = {}
    where: dict[tuple, str] = {}
    configs: dict[Column, tuple[dict[str, Any], str]] = {}
    for folder, results in sources:
        tags = _tag_names(results) - {"method", "seed"}
        for run in results.get("runs", []):
            if metric.field not in run:
                raise RunError(f"{folder}: a job without {metric.field!r}: {run.get('method')}")
            column = Column(results["preset"], tuple((k, v) for k, v in run.items() if k in tags))
            config, first = configs.setdefault(column, (results["config"], folder))
            if config != results["config"]:
                raise RunError(
                    f"{first} and {folder} ran {column.label} with different configurations: "
                    "compare them separately"
                )
            key = (column, run["method"], run["seed"])
            if key in where:
                raise RunError(
                    f"{run['method']} seed {run['seed']} ({column.label}) is in both "
                    f"{where[key]} and {folder}: pass one of them"
                )
            where[key] = folder
            runs.setdefault(column, {}).setdefault(run["method"], {})[run["seed"]] = run
    if not runs:
        raise RunError(f"no finished job in {', '.join(name for name, _ in sources)}")
    return Pooled(metric, runs)


def _tag_names(results: Mapping[str, Any]) -> set[str]:
    """The tags of a run's jobs: the keys of its seed aggregate that are not statistics."""
    statistic = re.compile(r"^(seeds|.*_per_seed|.*_mean|.*_std_between_seeds)$")
    return {k for row in results.get("aggregate", []) for k in row if not statistic.match(k)}


def paired(pooled: Pooled, ours: Sequence[float], theirs: Sequence[float]) -> PairedComparison:
    """Our values against theirs, pair by pair (the same seeds, or one seed's test episodes),
    oriented by the metric: positive differences favour ours."""
    return (
        compare_paired(ours, theirs)
        if pooled.metric.higher_is_better
        else compare_paired(theirs, ours)
    )


def comparison_lines(pooled: Pooled, method: str, against: Sequence[str]) -> list[str]:
    """The Markdown report of ``method`` against each of ``against``, column by column."""
    digits = pooled.metric.digits
    lines: list[str] = []
    for column, methods in pooled.runs.items():
        if method not in methods:
            continue
        others = [m for m in against if m in methods and m != method]
        seeds = sorted({s for runs in methods.values() for s in runs})
        lines += [
            f"\n### {column.label}\n",
            *_seed_table(methods, seeds, pooled.metric.field, digits),
        ]
        lines += ["", *_paired_over_seeds(pooled, column, method, others, digits)]
        lines += ["", *_paired_over_episodes(pooled, column, method, others, digits)]
    if not lines:
        raise RunError(f"no column has a {method!r} job")
    return lines


def _seed_table(
    methods: Mapping[str, Mapping[int, Mapping[str, Any]]],
    seeds: list[int],
    metric: str,
    digits: int,
) -> list[str]:
    """Per method: each seed's value ± its CI (the chosen test-time steps in brackets), and the
    mean over seeds ± its 95% t-interval."""
    lines = [
        "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± 95% CI over seeds |",
        "| --- " * (len(seeds) + 2) + "|",
    ]
    for name, runs in methods.items():
        cells = []
        for seed in seeds:
            run = runs.get(seed)
            steps = run and run.get("test_inner_steps")
            cells.append(
                "—"
                if run is None
                else f"{run[metric]:.{digits}f} ± {run['ci95']:.{digits}f}"
                + (f" ({steps})" if steps else "")
            )
        values = [r[metric] for r in runs.values()]
        over = (
            f"{statistics.fmean(values):.{digits}f} ± {mean_ci95(values)[1]:.{digits}f} "
            f"({len(values)} seeds)"
            if len(values) > 1
            else "(one seed)"
        )
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {over} |")
    return lines


def _paired_over_seeds(
    pooled: Pooled, column: Column, method: str, others: list[str], digits: int
) -> list[str]:
    lines = [
        f"Over seeds (difference: {method} better when positive):",
        "",
        "| comparison | seeds | per seed | mean ± 95% CI | better / worse / tied | sign test p "
        "| Wilcoxon p | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for other in others:
        runs = pooled.runs[column]
        seeds = sorted(set(runs[method]) & set(runs[other]))
        if len(seeds) < 2:
            lines.append(
                f"| {method} vs {other} | {len(seeds)} | — | — | — | — | — | too few seeds |"
            )
            continue
        ours = [runs[method][s][pooled.metric.field] for s in seeds]
        theirs = [runs[other][s][pooled.metric.field] for s in seeds]
        result = paired(pooled, ours, theirs)
        sign = 1 if pooled.metric.higher_is_better else -1
        per_seed = ", ".join(
            f"{sign * (a - b):+.{digits}f}" for a, b in zip(ours, theirs, strict=True)
        )
        lines.append(
            f"| {method} vs {other} | {len(seeds)} | {per_seed} | "
            f"{result.mean_difference:+.{digits}f} ± {result.ci95:.{digits}f} | "
            f"{result.above} / {result.below} / {result.ties} | {result.sign_test_p:.3g} | "
            f"{result.wilcoxon_p:.3g} | {result.verdict} |"
        )
    return lines


def _paired_over_episodes(
    pooled: Pooled, column: Column, method: str, others: list[str], digits: int
) -> list[str]:
    field = f"test_{pooled.metric.field}_by_episode"
    runs = pooled.runs[column]
    rows = []
    for other in others:
        for seed in sorted(set(runs[method]) & set(runs[other])):
            if field not in runs[method][seed] or field not in runs[other][seed]:
                continue
            result = paired(pooled, runs[method][seed][field], runs[other][seed][field])
            rows.append(
                f"| {method} vs {other} | {seed} | {result.count} | "
                f"{result.mean_difference:+.{digits}f} ± {result.ci95:.{digits}f} | "
                f"{result.above} / {result.below} / {result.ties} | {result.wilcoxon_p:.3g} | "
                f"{result.verdict} |"
            )
    if not rows:
        return []
    return [
        "Within each seed, over its test episodes (the same episodes for both methods):",
        "",
        "| comparison | seed | episodes | mean ± 95% CI | better / worse / tied | Wilcoxon p "
        "| verdict |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *rows,
    ]


def draw_seeds(pooled: Pooled, column: Column) -> Any:
    """A figure of ``column``: each method's value per seed with its 95% CI, one line each."""
    methods = pooled.runs[column]
    curves = {
        m: {s: r[pooled.metric.field] for s, r in runs.items()} for m, runs in methods.items()
    }
    errors = {m: {s: r["ci95"] for s, r in runs.items()} for m, runs in methods.items()}
    return plot_curves(curves, "seed", pooled.metric.label, column.label, errors=errors)


def aggregate_seeds(
    runs: Sequence[Mapping[str, Any]], keys: Sequence[str], metric: str
) -> list[dict[str, Any]]:
    """One row per job that differs only in its seed (tags ``keys`` but "seed"): the mean of
    ``metric`` over seeds, its between-seed standard deviation (None for one seed) and the
    per-seed values, in run order."""
    rows: dict[tuple, dict[str, Any]] = {}
    for run in runs:
        tags = {k: run[k] for k in keys if k != "seed"}
        row = rows.setdefault(tuple(tags.values()), {**tags, "seeds": [], f"{metric}_per_seed": []})
        row["seeds"].append(run["seed"])
        row[f"{metric}_per_seed"].append(run[metric])
    for row in rows.values():
        values = row[f"{metric}_per_seed"]
        row[f"{metric}_mean"] = statistics.fmean(values)
        row[f"{metric}_std_between_seeds"] = statistics.stdev(values) if len(values) > 1 else None
    return list(rows.values())


def tables_per_seed(
    runs: Sequence[Mapping[str, Any]],
    seeds: Sequence[int],
    table: Callable[[list[Mapping[str, Any]]], str],
) -> list[str]:
    """``table`` of each seed's runs, under a "Seed N:" heading when there are several seeds."""
    return [
        ("" if len(seeds) == 1 else f"\nSeed {seed}:\n")
        + table([run for run in runs if run["seed"] == seed])
        for seed in seeds
    ]


def seed_table(aggregate: Sequence[Mapping[str, Any]], metric: Metric) -> str:
    """Markdown: per job (its tags but the seed), ``metric`` over seeds as 'mean ±
    between-seed standard deviation', and each seed's value."""
    name, label = metric.field, metric.label
    fields = ("seeds", f"{name}_per_seed", f"{name}_mean", f"{name}_std_between_seeds")
    tags = [k for k in aggregate[0] if k not in fields] if aggregate else []
    lines = [
        "| " + " | ".join([*tags, f"{label} mean ± between-seed std", "per seed"]) + " |",
        "| --- " * (len(tags) + 2) + "|",
    ]
    for row in aggregate:
        spread = row[fields[3]]
        mean = f"{row[fields[2]]:.4f}" + ("" if spread is None else f" ± {spread:.4f}")
        pairs = zip(row["seeds"], row[fields[1]], strict=True)
        seeds = ", ".join(f"{value:.4f} (s{seed})" for seed, value in pairs)
        lines.append("| " + " | ".join([*(str(row[k]) for k in tags), mean, seeds]) + " |")
    return "\n".join(lines)


def plot_curves(
    curves: Mapping[str, Mapping[float, float]],
    xlabel: str,
    ylabel: str,
    title: str = "",
    log_x: bool = False,
    errors: Mapping[str, Mapping[float, float]] | None = None,
) -> Figure:
    """One line per labelled curve ({x: y}, drawn in x order), with markers: e.g. validation
    accuracy against test-time inner steps, one curve per learner. ``errors`` (the same labels
    and x values: {x: half-width}) draws each point's interval as an error bar, e.g. each
    seed's 95% CI. Integer x values (steps, blocks, seeds) get integer ticks; a long title
    wraps to fit the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    errors = errors or {}
    if unknown := set(errors) - set(curves):
        raise ValueError(f"errors for curves that are not drawn: {sorted(unknown)}")
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    for label, points in curves.items():
        xs = sorted(points)
        bars = errors.get(label)
        if bars is not None and set(bars) != set(points):
            raise ValueError(f"errors of {label!r} need the curve's x values {xs}")
        yerr = None if bars is None else [bars[x] for x in xs]
        ax.errorbar(xs, [points[x] for x in xs], yerr=yerr, marker="o", capsize=3, label=label)
    if log_x:
        ax.set_xscale("log")
    elif all(float(x).is_integer() for points in curves.values() for x in points):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=9)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main(argv: Sequence[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", type=Path, nargs="+", help="run folders (their results.json)")
    parser.add_argument(
        "--method", help="the method compared (default: the one its driver proposes, e.g. msr)"
    )
    parser.add_argument(
        "--against", nargs="+", help="the methods it is compared with (default: all)"
    )
    parser.add_argument("--figures", type=Path, help="draw seeds_<column>.png into this folder")
    args = parser.parse_args(argv)
    sources = [(str(f), read_results(f / "results.json")) for f in args.folders]
    found = {m for m in METRICS for _, r in sources if _reports(r, m)}
    if len(found) != 1:
        named = " and ".join(sorted(m.field for m in found)) or "no known metric"
        raise RunError(f"the folders' jobs report {named}: compare the runs of one driver")
    pooled = pool_runs(sources, found.pop())
    methods = {m for column in pooled.runs.values() for m in column}
    proposed = {r["proposed"] for _, r in sources if r.get("proposed")}
    if args.method is None and len(proposed) != 1:
        raise RunError(
            "the folders name no one proposed method (runs written before results.json "
            f"recorded it, or of several drivers): pass --method, one of {sorted(methods)}"
        )
    method = args.method or proposed.pop()
    if method not in methods:
        raise RunError(
            f"--method {method!r} ran in none of the folders; they hold {sorted(methods)}"
        )
    against = args.against or sorted(methods - {method})
    if unknown := set(against) - methods:
        raise RunError(f"--against {sorted(unknown)} ran in none of the folders")
    lines = comparison_lines(pooled, method, against)
    print("\n".join(lines))
    for column in pooled.runs if args.figures else ():
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", column.label).strip("-")
        figure = draw_seeds(pooled, column)
        print(f"wrote {save_figure(figure, args.figures / f'seeds_{slug}.png')}")
    return lines


def _reports(results: Mapping[str, Any], metric: Metric) -> bool:
    return any(metric.field in run for run in results.get("runs", []))


if __name__ == "__main__":
    run_cli(main, "experiments.report")
