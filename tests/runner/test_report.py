"""experiments.report: paired tests of methods over the seeds (and episodes) of finished runs,
pooled from several folders, on fabricated results.json files; readable curves."""

import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT

from experiments import report
from experiments.rundir import write_results
from msr.stats import compare_paired


def _results(folder, seeds, accuracy, config=None, proposed="msr"):
    """A few-shot results.json: ``accuracy(method, seed)`` gives each job's 600 episodes."""
    runs = []
    for seed in seeds:
        for method in ("maml", "msr", "protonet"):
            episodes = accuracy(method, seed)
            runs.append(
                {"method": method, "dataset": "omniglot", "ways": 5, "shots": 1, "seed": seed,
                 "accuracy": sum(episodes) / len(episodes), "ci95": 0.8,
                 "test_accuracy_by_episode": episodes,
                 "test_inner_steps": None if method == "protonet" else 10}
            )  # fmt: skip
    aggregate = [
        {"method": m, "dataset": "omniglot", "ways": 5, "shots": 1, "seeds": list(seeds),
         "accuracy_per_seed": [], "accuracy_mean": 0.0, "accuracy_std_between_seeds": None}
        for m in ("maml", "msr", "protonet")
    ]  # fmt: skip
    folder.mkdir()
    write_results(
        folder / "results.json",
        {"seeds": list(seeds), "preset": "cpu-long", "config": config or {"steps": 12000},
         "runs": runs, "aggregate": aggregate, "proposed": proposed},
    )  # fmt: skip
    return runs


def _episodes(method, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(15, 26, (600,), generator=g).double() * 4  # 60-100% in steps of 4
    lead = {"maml": 0.0, "msr": 2.0 + seed % 3, "protonet": 3.5}[method]
    return (base + lead).clamp(max=100).tolist()


def test_seeds_pooled_from_two_folders_give_the_paired_tests_and_a_figure(tmp_path):
    first = _results(tmp_path / "a", [0, 1, 2], _episodes)
    second = _results(tmp_path / "b", [3, 4], _episodes)
    command = [sys.executable, "-m", "experiments.report", str(tmp_path / "a"),
               str(tmp_path / "b"), "--figures", str(tmp_path / "figures")]  # fmt: skip
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    accuracy = {(r["method"], r["seed"]): r["accuracy"] for r in first + second}
    over_seeds = compare_paired(
        [accuracy["msr", s] for s in range(5)], [accuracy["maml", s] for s in range(5)]
    )
    assert over_seeds.verdict == "established"  # msr leads maml by 2-4 points on every seed
    row = next(line for line in done.stdout.splitlines() if line.startswith("| msr vs maml | 5 "))
    assert f"{over_seeds.mean_difference:+.1f} ± {over_seeds.ci95:.1f}" in row
    assert "| 5 / 0 / 0 | 0.0625 | 0.0625 | established |" in row  # 5 seeds: p >= 1/16
    protonet = next(line for line in done.stdout.splitlines() if "| msr vs protonet | 5 " in line)
    assert protonet.endswith("| not established |")  # behind on four seeds, ahead on one
    assert "| msr | 90.0 ± 0.8 (10) |" not in done.stdout  # values are the data's, not fixed
    assert "| msr vs maml | 3 | 600 |" in done.stdout  # within each seed, over its episodes
    assert (
        tmp_path / "figures" / "seeds_dataset-omniglot-ways-5-shots-1-preset-cpu-long.png"
    ).stat().st_size > 0


def test_a_job_in_two_folders_or_a_column_with_two_configs_is_refused(tmp_path):
    _results(tmp_path / "a", [0, 1], _episodes)
    _results(tmp_path / "b", [1, 2], _episodes)
    _results(tmp_path / "c", [5, 6], _episodes, config={"steps": 3000})
    for folders, message in (
        (["a", "b"], "maml seed 1 (dataset omniglot, ways 5, shots 1, preset cpu-long) is in both"),
        (["a", "c"], "ran dataset omniglot, ways 5, shots 1, preset cpu-long with different "
         "configurations"),
    ):  # fmt: skip
        command = [
            sys.executable,
            "-m",
            "experiments.report",
            *(str(tmp_path / f) for f in folders),
        ]
        done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


def test_an_unknown_method_is_refused_naming_what_ran(tmp_path, capsys):
    _results(tmp_path / "a", [0, 1], _episodes)
    with pytest.raises(report.RunError, match=r"--method 'anil' ran in none .*'maml', 'msr'"):
        report.main([str(tmp_path / "a"), "--method", "anil"])
    with pytest.raises(report.RunError, match=r"--against \['anil'\]"):
        report.main([str(tmp_path / "a"), "--against", "anil"])
    lines = report.main([str(tmp_path / "a"), "--against", "maml"])
    assert not any("protonet" in line for line in lines if line.startswith("| msr vs"))


def test_a_folder_that_names_no_proposed_method_needs_method(tmp_path):
    _results(tmp_path / "old", [0, 1], _episodes, proposed=None)  # as runs before it recorded it
    with pytest.raises(report.RunError, match=r"no one proposed method .* pass --method"):
        report.main([str(tmp_path / "old")])
    lines = report.main([str(tmp_path / "old"), "--method", "protonet"])
    assert any(line.startswith("| protonet vs maml |") for line in lines)


def test_integer_curves_get_integer_ticks_and_a_long_title_wraps():
    title = "a job name that is long: the adapted network on 50 test episodes (accuracy 88.0%)"
    figure = report.plot_curves(
        {"h-flip": {1: 0.4, 2: 0.3, 3: 0.3, 4: 0.1}}, "block", "error", title
    )
    ax = figure.axes[0]
    ticks = [t for t in ax.get_xticks() if 1 <= t <= 4]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert "\n" in ax.get_title() and ax.get_title().replace("\n", " ") == title
    assert ax.get_xlabel() == "block" and ax.get_ylabel() == "error"


def test_fractional_curves_keep_the_default_ticks():
    figure = report.plot_curves({"a": {0.5: 1.0, 1.5: 2.0}}, "x", "y", "short")
    ax = figure.axes[0]
    assert any(not float(t).is_integer() for t in ax.get_xticks())
    assert ax.get_title() == "short"


def test_curves_draw_error_bars_where_given_and_refuse_mismatched_ones():
    curves = {"msr": {0: 90.4, 1: 91.1}, "maml": {0: 89.2, 1: 88.7}}
    figure = report.plot_curves(curves, "seed", "accuracy (%)", errors={"msr": {0: 0.8, 1: 0.7}})
    ax = figure.axes[0]
    bars, no_bars = ax.containers[0].lines[2], ax.containers[1].lines[2]
    ends = [y for segment in bars[0].get_segments() for y in segment[:, 1]]
    assert ends == pytest.approx([89.6, 91.2, 90.4, 91.8])
    assert no_bars == () and [t for t in ax.get_xticks() if 0 <= t <= 1] == [0, 1]
    with pytest.raises(ValueError, match="not drawn"):
        report.plot_curves(curves, "seed", "y", errors={"protonet": {0: 1.0, 1: 1.0}})
    with pytest.raises(ValueError, match="x values"):
        report.plot_curves(curves, "seed", "y", errors={"msr": {0: 1.0}})
