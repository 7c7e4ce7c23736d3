"""How an experiment runs as a command: its flags, its device and process group, its exit.

- ``parse``: one argument builder for every driver (the experiment's own flags, then the run
  flags every driver shares), ``--help`` with defaults, the preset with its overrides applied.
- ``run_cli``: a ``RunError`` (a problem the user can fix) is one line and exit status 2 (1 for a
  failed write); SIGINT / SIGTERM stop the run at its next safe point (``raise_if_stopped``,
  between outer steps) with a message and status 130 / 143, and ``--resume`` continues it. A
  second signal stops it at once.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from experiments import report
from experiments.control import RunError
from experiments.run import Experiment, run_jobs
from experiments.rundir import claim_output, run_outputs, write_results
from msr.devices import DEVICE_HELP, resolve_device, reuse_freed_memory
from msr.distributed import rank_and_world_size

if TYPE_CHECKING:
    from experiments.presets import RunConfig

SEED_LIMIT = 2**63  # seeds are 0 <= seed < 2**63: what torch.manual_seed and the streams take


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` that says each option's default where it has one (not None, not a flag's
    False): what a run does when the option is left out."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or default is argparse.SUPPRESS
        if action.option_strings and not unset and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (outer steps, ways, shots, workers)."""
    return _parsed(text, int, lambda value: value >= 1, "a positive integer")


def positive_finite_float(text: str) -> float:
    """An argparse type: a finite number > 0 (a learning rate); refuses inf and nan."""
    return _parsed(text, float, lambda v: math.isfinite(v) and v > 0, "a positive finite number")


def seed_value(text: str) -> int:
    """An argparse type: a seed, 0 <= seed < 2**63."""
    return _parsed(text, int, lambda value: 0 <= value < SEED_LIMIT, "a seed in 0 .. 2**63 - 1")


def _parsed(text: str, kind: Callable[[str], Any], valid: Callable[[Any], bool], what: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not valid(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value


def renamed(old: str, new: str, flag: str) -> Callable[[str], str]:
    """An argparse type that accepts the old spelling ``old`` of a value, says once on stderr
    that it is now ``new``, and gives ``new`` (so users' scripts keep working)."""

    def convert(text: str) -> str:
        if text == old:
            print(
                f"note: {flag} {old} is now called {new}; {old} will stop working", file=sys.stderr
            )
            return new
        return text

    return convert


def add_run_arguments(
    parser: argparse.ArgumentParser, presets: Sequence[str], default: str
) -> None:
    """The flags every driver takes."""
    parser.add_argument("--preset", choices=sorted(presets), default=default, help="the scale")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument(
        "--seed",
        type=seed_value,
        default=0,
        help="seeds the data, the initialization and every random stream: same seed, same run",
    )
    seeds.add_argument(
        "--seeds",
        type=seed_value,
        nargs="+",
        help="run every job once per seed (each seed draws its own data and initialization); "
        "results.json gets the per-seed runs and an aggregate over seeds",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--steps", type=positive_int, help="override the preset's outer steps")
    parser.add_argument(
        "--batching", choices=("vmap", "loop", "grouped"), help="override the preset's"
    )
    parser.add_argument(
        "--inner-lr", type=positive_finite_float, help="override the initial inner lr"
    )
    parser.add_argument(
        "--set",
        nargs="+",
        metavar="FIELD=VALUE",
        help="override any field of the preset (experiments/presets.py), e.g. hidden=64 "
        "inner_steps=2 symmetry_lr_scale=10; a tuple field takes a comma list (1,3,5)",
    )
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument(
        "--tensorboard",
        action="store_true",
        help="also log the metrics to DIR/tensorboard (metrics.jsonl stays the record)",
    )
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        help="run the jobs in this many processes, one thread each (same results)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in DIR (same preset, seeds, config and code; --steps may grow): "
        "finished jobs are kept, a job cut off continues from its last checkpoint",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the earlier run's files in DIR (without it, a non-empty DIR is refused)",
    )


def parse(
    experiment: Experiment, argv: Sequence[str] | None
) -> tuple[argparse.Namespace, RunConfig, torch.device]:
    """The command line of ``experiment``: its arguments, its preset with the overrides applied,
    and the device to train on (joining the process group under ``torchrun``)."""
    parser = argparse.ArgumentParser(
        prog=f"python -m experiments.{experiment.name}",
        description=experiment.description,
        formatter_class=DefaultsHelpFormatter,
    )
    experiment.add_arguments(parser)
    add_run_arguments(parser, list(experiment.presets), experiment.default_preset)
    args = parser.parse_args(argv)
    try:
        cfg = experiment.config(args)
    except ValueError as error:
        parser.error(str(error))
    args.seeds = args.seeds or [args.seed]
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must differ, got {args.seeds}")
    torchrun = rank_and_world_size(launched=True)[1] > 1
    if args.workers > 1 and torchrun:
        parser.error("--workers > 1 cannot be combined with torchrun (one process per rank)")
    if torchrun and args.device.startswith("cuda:"):
        parser.error(f"--device {args.device}: under torchrun each rank uses cuda:LOCAL_RANK")
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    overrides = {"steps": args.steps, "batching": args.batching, "inner_lr": args.inner_lr}
    try:
        cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
        cfg = with_settings(cfg, args.set or [])
    except ValueError as error:
        parser.error(str(error))
    if cfg.meta_batch % (ranks := rank_and_world_size(launched=True)[1]):
        parser.error(
            f"a meta-batch of {cfg.meta_batch} tasks does not split evenly over {ranks} torchrun "
            "ranks (uneven shards would weight tasks unequally): choose --nproc-per-node to "
            "divide it, or --set meta_batch=N"
        )
    return args, cfg, setup_distributed(args, device)


def with_settings(cfg: RunConfig, settings: Sequence[str]) -> RunConfig:
    """``cfg`` with each ``FIELD=VALUE`` of ``settings`` applied, parsed as the field's default
    is typed (a tuple as a comma list); an unknown field or a bad value is a ``ValueError``."""
    known = {field.name: getattr(cfg, field.name) for field in fields(cfg)}
    changes: dict[str, Any] = {}
    for setting in settings:
        name, equals, text = setting.partition("=")
        if not equals or name not in known:
            raise ValueError(
                f"--set {setting}: expected FIELD=VALUE with FIELD one of {', '.join(known)}"
            )
        if name in changes:
            raise ValueError(f"--set {name} is given twice")
        changes[name] = _typed_like(known[name], text, name)
    return replace(cfg, **changes)  # RunConfig.__post_init__ checks the values


def _typed_like(default: Any, text: str, name: str) -> Any:
    """``text`` parsed as ``default``'s type."""
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false"):
                raise ValueError
            return text.lower() == "true"
        if isinstance(default, tuple):
            kind = type(default[0]) if default else int
            return tuple(kind(item) for item in text.split(","))
        return type(default)(text)
    except ValueError:
        raise ValueError(
            f"--set {name}={text}: expected {type(default).__name__} like {default!r}"
        ) from None


def setup_distributed(args: argparse.Namespace, device: torch.device) -> torch.device:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1); return the device
    this process trains on: on CUDA each rank takes ``cuda:LOCAL_RANK`` and nccl, on the CPU gloo.

    Only rank 0 writes ``--out`` (and ``--tensorboard``) and shows a progress bar. The other
    ranks keep their files in a private temporary folder, removed when they end; with
    ``--resume`` rank 0 first sends them its run's files (``share_run_files``), so that every
    rank continues from the same checkpoint, on one machine or several.
    """
    if rank_and_world_size(launched=True)[1] == 1:
        return device
    timeout = datetime.timedelta(seconds=collective_timeout())
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    rank = dist.get_rank()
    if rank:
        remove_stale_rank_folders()
        args.out = Path(tempfile.mkdtemp(prefix=f"{RANK_FOLDER_PREFIX}{rank}-pid{os.getpid()}-"))
        atexit.register(shutil.rmtree, args.out, ignore_errors=True)
        args.tensorboard = None
    return device


RANK_FOLDER_PREFIX = "msr-rank"  # $TMPDIR/msr-rank<r>-pid<pid>-*: a rank > 0's private --out
COLLECTIVE_TIMEOUT_S = 120.0


def collective_timeout() -> float:
    """Seconds a torchrun collective waits for the other ranks before the run ends with one
    line (a rank killed, stopped or stuck): ``$MSR_COLLECTIVE_TIMEOUT_S``, default 120."""
    text = os.environ.get("MSR_COLLECTIVE_TIMEOUT_S", str(COLLECTIVE_TIMEOUT_S))
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise RunError(f"MSR_COLLECTIVE_TIMEOUT_S must be a positive number of seconds, got {text}")
    return seconds


def remove_stale_rank_folders() -> None:
    """Remove the private folders of ranks that ended without cleaning up (killed): those of
    this user whose process is gone."""
    for folder in Path(tempfile.gettempdir()).glob(f"{RANK_FOLDER_PREFIX}*-pid*-*"):
        pid = folder.name.split("-pid", 1)[1].split("-", 1)[0]
        try:
            owned = folder.is_dir() and folder.lstat().st_uid == os.getuid()
        except OSError:
            continue
        if owned and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # no signal: only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    return True


def share_run_files(out: Path) -> None:
    """Under torchrun with ``--resume``: rank 0 sends the files of its run in ``out``
    (``rundir.run_outputs``: results.json and the job folders; not tensorboard/) to every
    other rank, which writes them into its own ``out`` (its private folder). Every rank must
    call it, rank 0 holding ``out``'s lock."""
    files: list[dict[str, bytes] | None] = [None]
    if dist.get_rank() == 0:
        paths = [out / name for name in run_outputs(out) if name != "tensorboard"]
        paths += [path for folder in paths if folder.is_dir() for path in folder.iterdir()]
        files = [{str(p.relative_to(out)): p.read_bytes() for p in paths if p.is_file()}]
    dist.broadcast_object_list(files, src=0)
    if dist.get_rank():
        for name, contents in files[0].items():  # type: ignore[union-attr]
            (out / name).parent.mkdir(exist_ok=True)
            (out / name).write_bytes(contents)


def main(experiment: Experiment, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run ``experiment`` as its command line asks; its results.json contents."""
    args, cfg, device = parse(experiment, argv)
    reuse_freed_memory()
    data = experiment.check(args, cfg, device)  # before --out is touched: nothing is lost
    rank, world_size = rank_and_world_size()
    with claim_output(args.out, args.resume, args.overwrite):  # rank > 0: its private folder
        if world_size > 1 and args.resume:
            share_run_files(args.out)
        results = run_jobs(experiment, args, cfg, device, data)
        lines = experiment.report(results, args)  # may add summary fields
        write_results(args.out / "results.json", results)
    if rank:
        return results  # rank 0 reports
    devices = ", ".join(sorted({run["device"] for run in results["runs"]}))
    print(
        f"\nMeta-test {experiment.metric.label} ± 95% CI over {cfg.test_tasks} held-out tasks "
        f"(preset {args.preset}, seed{'s' if len(args.seeds) > 1 else ''} "
        f"{', '.join(map(str, args.seeds))}, {cfg.steps} outer steps on {devices}, "
        f"training {results['wall_s']:.0f} s summed over jobs):\n"
    )
    if len(args.seeds) > 1:
        print(report.seed_table(results["aggregate"], experiment.metric))
        if any(run["method"] == experiment.proposed for run in results["runs"]):
            pooled = report.pool_runs([(str(args.out), results)], experiment.metric)
            print("\n".join(report.comparison_lines(pooled, experiment.proposed, args.methods)))
    print("\n".join(lines))
    print(f"\nWrote {args.out}/results.json and a folder per job (model, metrics, result, figure)")
    return results
