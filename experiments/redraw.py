"""Redraw the figures of a finished run from the files it saved.

    python -m experiments.redraw DIR

For every finished job in DIR (a job folder with its result.json, of ``experiments.synthetic``,
``experiments.rotation`` or ``experiments.few_shot``), the job's plan is rebuilt from its model
file's driver, tags and config, its learned state loaded (with ``weights_only=True``), and its
figure drawn again into its folder, titled with the job's numbers from its result.json. Use it
after changing the plotting code, or on a run copied from elsewhere.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from experiments import few_shot, rotation, synthetic
from experiments.control import RunError, run_cli
from experiments.rundir import busy_holder, job_folders, read_checkpoint, read_results, save_figure

EXPERIMENTS = {e.name: e for e in (synthetic.EXPERIMENT, rotation.EXPERIMENT, few_shot.EXPERIMENT)}


def redraw_run(out: Path) -> list[Path]:
    """Redraw every finished job's figure in ``out``; returns the figures written."""
    if holder := busy_holder(out):
        raise RunError(f"{out} is in use by process {holder}: redraw once that run has ended")
    if not (out / "results.json").is_file():
        raise RunError(f"{out / 'results.json'} not found: is {out} a run folder?")
    jobs = job_folders(out)
    finished = [out / job for job in jobs if (out / job / "result.json").exists()]
    if not finished:
        raise RunError(
            f"{out}: no job has finished ({len(jobs)} job folder{'s' * (len(jobs) != 1)}, none "
            "with its result.json), so there is nothing to redraw"
        )
    written = []
    for folder in finished:
        entry = read_results(folder / "result.json")["result"]
        saved = read_checkpoint(folder / "model.pt")
        job = saved["metadata"]
        experiment = EXPERIMENTS.get(job["driver"])
        if experiment is None:
            raise RunError(f"{folder / 'model.pt'}: unknown driver {job['driver']!r}")
        config_type = type(next(iter(experiment.presets.values())))  # its presets' dataclass
        plan = experiment.plan(job["tags"], config_type(**job["config"]), None, torch.device("cpu"))
        plan.learner.load_state_dict(saved["state_dict"])
        if plan.draw is not None and (figure := plan.draw(entry)) is not None:
            written.append(save_figure(figure, folder / experiment.figure))
    return written


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="the run's output directory")
    args = parser.parse_args(argv)
    written = redraw_run(args.out)
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    run_cli(main, "experiments.redraw")
