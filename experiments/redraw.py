"""Redraw the figures of a finished run from the files it saved.

    python -m experiments.redraw DIR

For every DIR/model_*.pt (of ``experiments.synthetic``, ``experiments.rotation`` or
``experiments.few_shot``), the job's plan is rebuilt from the file's driver, tags and config, its
learned state loaded (with ``weights_only=True``), and its figure drawn again into DIR, titled
with the job's numbers from DIR/results.json. Use it after changing the plotting code, or on a
run copied from elsewhere.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from experiments import few_shot, rotation, synthetic
from experiments.control import RunError, run_cli
from experiments.rundir import busy_holder
from experiments.runfiles import read_checkpoint, read_results, save_figure

EXPERIMENTS = {e.name: e for e in (synthetic.EXPERIMENT, rotation.EXPERIMENT, few_shot.EXPERIMENT)}


def redraw_run(out: Path) -> list[Path]:
    """Redraw every model file's figure in ``out``; returns the figures written."""
    results = out / "results.json"
    if holder := busy_holder(out):
        raise RunError(f"{out} is in use by process {holder}: redraw once that run has ended")
    if not results.is_file():
        raise RunError(f"{results} not found: is {out} a finished run?")
    runs = read_results(results).get("runs", [])
    models = sorted(out.glob("model_*.pt"))
    if not models:
        raise RunError(f"{out} holds no model_*.pt files to redraw from")
    written, training = [], []
    for path in models:
        saved = read_checkpoint(path)
        job = saved["metadata"]
        experiment = EXPERIMENTS.get(job["driver"])
        if experiment is None:
            raise RunError(f"{path}: unknown driver {job['driver']!r}")
        if job["step"] < job["config"]["steps"]:
            training.append(path.name)  # a job still to finish (--resume)
            continue
        tags = job["tags"]
        entry = next((r for r in runs if all(r.get(k) == v for k, v in tags.items())), None)
        if entry is None:
            raise RunError(f"{path}: no run {tags} in {results}")
        cpu = torch.device("cpu")
        config_type = type(next(iter(experiment.presets.values())))  # its presets' dataclass
        cfg = config_type(**job["config"])
        plan = experiment.plan(tags, cfg, None, cpu)
        plan.learner.load_state_dict(saved["state_dict"])
        if plan.draw is not None and (figure := plan.draw(entry)) is not None:
            written.append(save_figure(figure, experiment.figure_path(out, tags)))
    if training and not written:
        raise RunError(
            f"{out}: no job has finished training ({', '.join(training[:3])} "
            f"{'is' if len(training) == 1 else 'are'} not done), so there is nothing to redraw"
        )
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
