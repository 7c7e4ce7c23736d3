"""Redraw the figures of a finished run from the files it saved.

    python -m experiments.redraw DIR

For every DIR/model_*.pt written by ``experiments.synthetic`` or ``experiments.rotation``, the
model is rebuilt from its driver, seed, tags and config, its learned state loaded (with
``weights_only=True``), and its figure drawn again into DIR, titled with the run's numbers from
DIR/results.json. Use it after changing the plotting code, or on a run copied from elsewhere.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from experiments import rotation, synthetic
from experiments.common import load_model, read_results
from experiments.rundir import RunError, run_cli

DRIVERS = {"synthetic": synthetic.redraw, "rotation": rotation.redraw}


def redraw_run(out: Path) -> list[Path]:
    """Redraw every model file's figure in ``out``; returns the figures written."""
    results = out / "results.json"
    if not results.is_file():
        raise RunError(f"{results} not found: is {out} a finished run?")
    runs = read_results(results).get("runs", [])
    models = sorted(out.glob("model_*.pt"))
    if not models:
        raise RunError(f"{out} holds no model_*.pt files to redraw from")
    written = []
    for path in models:
        saved = load_model(path)
        if saved.get("driver") == "few_shot":
            continue  # the few-shot driver draws no figures
        if saved.get("driver") not in DRIVERS:
            raise RunError(f"{path}: unknown driver {saved.get('driver')!r}")
        tags = saved["tags"]
        entry = next((r for r in runs if all(r.get(k) == v for k, v in tags.items())), None)
        if entry is None:
            raise RunError(f"{path}: no run {tags} in {results}")
        figure = DRIVERS[saved["driver"]](saved, entry, out)
        if figure is not None:
            written.append(figure)
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
