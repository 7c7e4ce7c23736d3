"""What every experiment runs on: its jobs, the meta-training loop, its results.

An experiment (``Experiment``: one small file per table) says which jobs a command line asks
for, and for each job which data, which model and which metrics (a ``Plan``). This module does
the rest, the same way for every experiment (``experiments.cli.main`` calls it):

- ``run_jobs``: one job per tag combination and seed, in this process or in ``--workers``
  processes, under one progress bar; results.json after every job.
- ``fit``: the meta-training of one job: the meta-batch of step ``s`` from a stream keyed by
  (seed, s), ``outer_steps`` (the only place where outer steps happen), a probe logged every
  ``eval_every`` steps, a checkpoint every ``checkpoint_every`` steps and at a stop.
- One resume rule: ``--resume`` keeps the finished jobs in results.json and continues every
  other job from its checkpoint, bit for bit; a run of another preset, seed, config or commit
  is refused, naming the differing fields; ``--steps`` may grow (a finished job then trains on).
"""

from __future__ import annotations

import argparse
import functools
import math
import multiprocessing
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, CancelledError, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from experiments import report
from experiments.control import RunError, RunFailedError, Stopped, raise_if_stopped
from experiments.presets import RunConfig
from experiments.rundir import run_outputs
from experiments.runfiles import (
    MetricsLog,
    differences,
    keep_lines,
    provenance,
    read_checkpoint,
    read_results,
    save_checkpoint,
    save_figure,
    write_results,
)
from msr import MAML, EpisodicLearner, SymmetryLayer, TaskBatch, partition_parameters
from msr.devices import reuse_freed_memory
from msr.distributed import (
    average_gradients,
    rank_and_world_size,
    shard_tasks,
)
from msr.episodic import NonFiniteLossError
from msr.streams import keyed_generator

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Tags = dict[str, Any]  # what names a job, e.g. {"method": "MSR-FC", "k": 1, "seed": 0}


@dataclass
class Plan:
    """One job, ready to train: what an experiment hands ``run_jobs``."""

    learner: EpisodicLearner
    meta_batch: Callable[[torch.Generator], TaskBatch]  # training tasks from a step's stream
    probe: Callable[[], dict[str, float]]  # scored and logged every ``eval_every`` steps
    result: Callable[[], dict[str, Any]]  # the job's results.json fields, after training
    draw: Callable[[dict[str, Any]], Figure | None] | None = None  # its U_<job>.png
    stream_device: torch.device | str = "cpu"  # where the steps' streams draw


class Experiment:
    """Which data, which model and which metrics: one subclass per table (see the module)."""

    name: str  # experiments.<name>, and the "driver" of its model files
    description: str
    presets: Mapping[str, RunConfig]
    default_preset = "quick"
    metric = report.MSE  # what its jobs are scored by
    proposed: str | None = None  # the method the others are compared with over seeds
    figure_prefix = "U"  # a job's figure is <prefix>_<job name>.png

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """The experiment's own flags (which methods, which data)."""

    def config(self, args: argparse.Namespace) -> RunConfig:
        """The preset the command line names; a bad combination of flags is a ``ValueError``
        (a usage error)."""
        return self.presets[args.preset]

    def check(
        self, args: argparse.Namespace, cfg: RunConfig, device: torch.device
    ) -> dict[str, str] | None:
        """Check the inputs (e.g. load the data) before ``--out`` is touched (``RunError``);
        the data the run reads, as {"path", "sha256"} (``msr.data.fingerprint``), recorded in
        results.json and checked on ``--resume``; None for data drawn from the seed."""
        return None

    def jobs(self, args: argparse.Namespace) -> list[Tags]:
        """The tags of every job the command line asks for, without the seed."""
        raise NotImplementedError

    def job_name(self, tags: Tags) -> str:
        """The job's part of its file names (model_<name>.pt, U_<name>.png)."""
        return "_".join(str(v) for k, v in tags.items() if k != "seed") + f"_s{tags['seed']}"

    def figure_path(self, out: Path, tags: Tags) -> Path:
        """Where the job's figure goes in the run directory ``out``."""
        return out / f"{self.figure_prefix}_{self.job_name(tags)}.png"

    def tune(
        self,
        tags: Tags,
        cfg: RunConfig,
        device: torch.device,
        advance: Callable[[int], None],
    ) -> tuple[RunConfig, dict[str, Any]]:
        """Choose hyper-parameters before training (on training tasks only): the job's config
        and what to record of the choice. Repeated on resume (it is seeded)."""
        return cfg, {}

    def tuning_steps(self, tags: Tags, cfg: RunConfig) -> int:
        """The outer steps ``tune`` takes (for the progress bar)."""
        return 0

    def plan(
        self, tags: Tags, cfg: RunConfig, args: argparse.Namespace | None, device: torch.device
    ) -> Plan:
        """The job's learner, data and metrics (``args`` is None when redrawing a figure)."""
        raise NotImplementedError

    def report(self, results: dict[str, Any], args: argparse.Namespace) -> list[str]:
        """The lines printed after the run (tables); may add summary fields to ``results``."""
        return []


def build_maml(model: torch.nn.Module, cfg: RunConfig, **options: Any) -> MAML:
    """MAML with the preset's inner loop and learned per-tensor inner lrs (second order unless
    ``options`` say otherwise)."""
    return MAML(
        model,
        inner_steps=cfg.inner_steps,
        inner_lr=cfg.inner_lr,
        batching=cfg.batching,  # type: ignore[arg-type]
        **options,
    )


def run_jobs(
    experiment: Experiment,
    args: argparse.Namespace,
    cfg: RunConfig,
    device: torch.device,
    data: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run every job (its tags and each seed) under one progress bar, logging to
    ``args.out/metrics.jsonl``; results.json is rewritten (atomically) after every job, so
    finished jobs survive a crash. With ``--resume`` the finished jobs are kept and the others
    continue from their checkpoints (``fit``); every job seeds itself, so the outcome equals an
    uninterrupted run's. With ``args.workers`` > 1 the jobs run in that many processes (one
    thread each), with the same results; their metrics lines interleave."""
    jobs = [{**tags, "seed": seed} for seed in args.seeds for tags in experiment.jobs(args)]
    keys = list(jobs[0])
    metrics_path, results_path = args.out / "metrics.jsonl", args.out / "results.json"
    results: dict[str, Any] = {
        **provenance(args.seeds, args.preset),
        "config": asdict(cfg),
        "data": data,  # what experiment.check found
        "proposed": experiment.proposed,  # the method experiments.report compares by default
        "runs": [],
        "aggregate": [],
        "wall_s": 0.0,
        # the files this run writes, and only those, are what --overwrite removes
        "outputs": sorted(
            {"results.json", "metrics.jsonl", *(["tensorboard"] if args.tensorboard else [])}
            | {_model_path(args.out, experiment, tags).name for tags in jobs}
            | {experiment.figure_path(args.out, tags).name for tags in jobs}
        ),
    }

    def key(record: Mapping[str, Any]) -> tuple:
        return tuple(record.get(k) for k in keys)

    if args.resume:
        results.update(_resumable(results_path, results, cfg))
        finished = {key(run) for run in results["runs"]}
        reached = {  # how far each unfinished job's checkpoint got
            key(tags): read_checkpoint(path)["metadata"]["step"]
            for tags in jobs
            if key(tags) not in finished
            and (path := _model_path(args.out, experiment, tags)).exists()
        }
        keep_lines(
            metrics_path,
            lambda record: (
                key(record) in finished or record["step"] <= reached.get(key(record), -1)
            ),
        )
    else:
        metrics_path.unlink(missing_ok=True)
    write_results_file(args.out, results)  # a stop from here on can --resume
    order = {key(tags): i for i, tags in enumerate(jobs)}
    prior_wall, start = results["wall_s"], time.perf_counter()

    def record(entry: dict[str, Any]) -> None:
        results["runs"].append(entry)  # kept in job order
        results["runs"].sort(key=lambda run: order.get(key(run), len(order)))
        results["aggregate"] = report.aggregate_seeds(
            results["runs"], keys, experiment.metric.field
        )
        results["wall_s"] = prior_wall + time.perf_counter() - start
        write_results_file(args.out, results)

    def steps_of(tags: Tags) -> int:
        return cfg.steps + experiment.tuning_steps(tags, cfg)

    todo = [tags for tags in jobs if key(tags) not in {key(run) for run in results["runs"]}]
    board = args.out / "tensorboard" if args.tensorboard else None
    with tqdm(
        total=sum(map(steps_of, jobs)),
        initial=sum(map(steps_of, jobs)) - sum(map(steps_of, todo)),
        desc=experiment.name,
        unit="step",
        disable=rank_and_world_size()[0] > 0,
    ) as bar:
        run = functools.partial(run_job, experiment, cfg=cfg, args=args, device=device)
        if args.workers > 1:
            _run_in_processes(todo, run, args.workers, (metrics_path, board), record, bar, steps_of)
        else:
            with MetricsLog(metrics_path, board) as log:
                for tags in todo:
                    bar.set_postfix_str(" ".join(str(v) for v in tags.values()))
                    record(run(tags, log=log, advance=bar.update))
    return results


def write_results_file(out: Path, results: dict[str, Any]) -> None:
    """results.json, its ``outputs`` grown by the run files now in ``out`` (e.g. a report's
    figures): what a run writes in ``out`` while it holds the lock is its own."""
    results["outputs"] = sorted({*results["outputs"], *run_outputs(out)})
    write_results(out / "results.json", results)


def _resumable(path: Path, ours: dict[str, Any], cfg: RunConfig) -> dict[str, Any]:
    """The runs and wall time to keep from ``path``, checked to be this run's (its provenance
    and config; only ``steps`` may grow), a missing, corrupt or foreign file being a
    ``RunError``. A job finished at fewer steps than ``cfg.steps`` is not kept: it trains on."""
    if not path.exists():
        raise RunError(f"--resume given but {path} does not exist")
    previous = read_results(path)
    if not isinstance(previous.get("runs"), list):
        raise RunError(f"{path} is not a results file of these drivers (no list of runs)")
    mutable = ("runs", "aggregate", "wall_s", "outputs", "data", "proposed")
    theirs = {k: previous.get(k) for k in ours if k not in mutable}
    if isinstance(theirs.get("config"), dict):
        theirs["config"] = {**theirs["config"], "steps": cfg.steps}
    if different := differences(theirs, {k: ours[k] for k in theirs}):
        raise RunError(f"{path} belongs to another run; differing (theirs, ours): {different}")
    data, trained_on = ours["data"], previous.get("data")
    if (data and data["sha256"]) != (trained_on and trained_on.get("sha256")):
        where = trained_on.get("path") if isinstance(trained_on, dict) else "unrecorded data"
        raise RunError(
            f"{path} trained on other data ({where}) than this run reads "
            f"({data['path'] if data else 'data drawn from the seed'}): resume with that data"
        )
    for run in previous["runs"]:
        if run["steps"] > cfg.steps:
            raise RunError(
                f"{path}: a job has trained {run['steps']} steps, more than --steps {cfg.steps}: "
                "resume with at least as many (or start a new run)"
            )
    runs = [run for run in previous["runs"] if run["steps"] == cfg.steps]
    return {"runs": runs, "wall_s": previous["wall_s"]}


def _model_path(out: Path, experiment: Experiment, tags: Tags) -> Path:
    return out / f"model_{experiment.job_name(tags)}.pt"


def run_job(
    experiment: Experiment,
    tags: Tags,
    *,
    cfg: RunConfig,
    args: argparse.Namespace,
    device: torch.device,
    log: MetricsLog,
    advance: Callable[[int], None],
) -> dict[str, Any]:
    """Tune, meta-train and score one job, and draw its figure; its results.json entry."""
    seed = tags["seed"]
    tuned, notes = experiment.tune(tags, cfg, device, advance)
    torch.manual_seed(seed)
    plan = experiment.plan(tags, tuned, args, device)
    wall = fit(
        plan,
        tuned,
        seed,
        tags=tags,
        log=log,
        checkpoint=_model_path(args.out, experiment, tags),
        identity={
            "driver": experiment.name,
            "seed": seed,
            "tags": tags,
            "preset": args.preset,
        },
        advance=advance,
    )
    entry = {**tags, **notes, **plan.result(), "steps": cfg.steps, "wall_s": wall}
    entry["device"] = str(device)
    model = _model_path(args.out, experiment, tags)  # as the job leaves the learner (e.g. the
    saved = read_checkpoint(model)  # test-time inner steps its result chose: msr.load's default)
    save_checkpoint(model, plan.learner, saved["metadata"], saved["state"])
    metric = experiment.metric
    final = entry[metric.field] * metric.board_scale
    log.hparams(tags, asdict(tuned), {f"final/{metric.field}": final})
    if plan.draw is not None and (figure := plan.draw(entry)) is not None:
        save_figure(figure, experiment.figure_path(args.out, tags))
    return entry


def fit(
    plan: Plan,
    cfg: RunConfig,
    seed: int,
    *,
    tags: Tags | None = None,
    log: MetricsLog | None = None,
    checkpoint: Path | None = None,
    identity: dict[str, Any] | None = None,
    advance: Callable[[int], None] = lambda steps: None,
) -> float:
    """Meta-train ``plan.learner`` for ``cfg.steps`` outer steps with Adam (and the preset's
    cosine schedule); its training wall seconds.

    Step ``s`` trains on ``plan.meta_batch`` of a stream keyed by (``seed``, ``s``). Every
    ``cfg.eval_every`` steps and at the last, ``plan.probe()`` is logged with ``tags``; every
    ``cfg.checkpoint_every`` steps, at the last and at a stop, the learner, optimizer and step
    go to ``checkpoint`` (the job's model file, with ``identity``: what rebuilds the model).
    If ``checkpoint`` exists the job continues from it, bit for bit (a stop during a probe
    leaves the step trained and its probe owed; the resumed job probes it first); a file of
    another job or config (``identity``, ``cfg`` but ``steps``) is refused.
    """
    learner, tags = plan.learner, tags or {}
    optimizer = torch.optim.Adam(outer_groups(learner, cfg), lr=cfg.outer_lr)
    state = _load_checkpoint(checkpoint, identity, cfg, learner, optimizer)
    first = 1 if state is None else state["step"] + 1
    start = time.perf_counter() - (0.0 if state is None else state["elapsed_s"])

    def save(step: int, unvalidated: float | None = None) -> None:
        if checkpoint is not None:
            progress = {
                "config": asdict(cfg),
                "step": step,
                "elapsed_s": time.perf_counter() - start,
                "unvalidated": unvalidated,  # the train loss of a step whose probe was cut off
            }
            state = {"optimizer": optimizer.state_dict()}
            save_checkpoint(checkpoint, learner, {**(identity or {}), **progress}, state)

    def probe(step: int, train_loss: float) -> None:
        try:
            scores = plan.probe()
        except Stopped:  # the step is trained: keep it, and owe its probe
            save(step, unvalidated=train_loss)
            raise
        elapsed = time.perf_counter() - start
        log.write(**tags, step=step, train_loss=train_loss, **scores, elapsed_s=elapsed)
        if log.board:
            log.figures(tags, step, sharing_figures(learner))

    if state is None:
        save(0)  # a job stopped before its first checkpoint resumes from here
    elif log is not None:
        owed = state["unvalidated"] is not None  # the step's probe was cut off: redo it
        log.continue_from(tags, state["step"] + (not owed))
        if owed:
            probe(state["step"], state["unvalidated"])
            save(state["step"])
    advance(first - 1)
    floor = cfg.outer_lr * cfg.final_lr_fraction
    for step, train_loss in outer_steps(
        learner,
        optimizer,
        lambda step: plan.meta_batch(keyed_generator(seed, step, plan.stream_device)),
        range(first, cfg.steps + 1),
        what=str(tags),
        kept=f"the last checkpoint ({checkpoint}) and the finished jobs are kept"
        if checkpoint
        else "nothing of it is kept",
        learning_rate=None
        if cfg.final_lr_fraction == 1
        else lambda step: (
            floor + (cfg.outer_lr - floor) * (1 + math.cos(math.pi * (step - 1) / cfg.steps)) / 2
        ),
        on_stop=save,
    ):
        advance(1)
        if log is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
            probe(step, train_loss)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save(step)
    return time.perf_counter() - start


def sharing_figures(learner: EpisodicLearner) -> dict[str, Figure]:
    """``msr.viz.plot_layer`` of each layer whose sharing is learned, by TensorBoard tag
    (``sharing/<layer name>``)."""
    from msr import viz

    layers = [
        (name or "model", layer)
        for name, layer in learner.model.named_modules()
        if isinstance(layer, SymmetryLayer) and any(True for _ in layer.meta_parameters())
    ]
    return {f"sharing/{name}": viz.plot_layer(layer, title=name) for name, layer in layers}


def outer_groups(learner: EpisodicLearner, cfg: RunConfig) -> list[dict[str, Any]]:
    """Adam's parameter groups: the learned symmetry (U) at ``cfg.symmetry_lr_scale`` times
    the outer lr, everything else (initial v, biases, inner lrs) at the outer lr. Each group's
    ``lr_scale`` carries its share through the cosine schedule."""
    meta, _ = partition_parameters(learner.model)
    named = dict(learner.model.named_parameters())
    symmetry = [named[name] for name in meta] if cfg.symmetry_lr_scale != 1 else []
    rest = [p for p in learner.parameters() if all(p is not q for q in symmetry)]
    groups = [{"params": rest, "lr_scale": 1.0}]
    if symmetry:
        lr = cfg.outer_lr * cfg.symmetry_lr_scale
        groups.append({"params": symmetry, "lr": lr, "lr_scale": cfg.symmetry_lr_scale})
    return groups


def _load_checkpoint(
    path: Path | None,
    identity: dict[str, Any] | None,
    cfg: RunConfig,
    learner: EpisodicLearner,
    optimizer: torch.optim.Optimizer,
) -> dict[str, Any] | None:
    """The progress recorded in the checkpoint at ``path`` (None if there is none: step,
    elapsed_s, unvalidated), checked to be this job's, loaded into ``learner`` and
    ``optimizer``."""
    if path is None or not path.exists():
        return None
    saved = read_checkpoint(path, map_location=next(learner.parameters()).device)
    state, identity = saved["metadata"], identity or {}
    theirs = {
        **{k: state.get(k) for k in identity},
        "config": {**state["config"], "steps": cfg.steps},
    }
    if different := differences(theirs, {**identity, "config": asdict(cfg)}):
        raise RunError(f"{path} belongs to another run; differing (theirs, ours): {different}")
    if cfg.steps < state["step"]:
        raise RunError(
            f"{path} has trained {state['step']} steps, more than --steps {cfg.steps}: resume "
            "with at least as many (or start a new run)"
        )
    learner.load_state_dict(saved["state_dict"])
    optimizer.load_state_dict(saved["state"]["optimizer"])
    return state


def outer_steps(
    learner: EpisodicLearner,
    optimizer: torch.optim.Optimizer,
    meta_batch: Callable[[int], TaskBatch],
    steps: Iterable[int],
    *,
    what: str,
    kept: str,
    learning_rate: Callable[[int], float] | None = None,
    on_stop: Callable[[int], None] | None = None,
) -> Iterator[tuple[int, float]]:
    """Take one outer step for each of ``steps`` on ``meta_batch(step)`` (at
    ``learning_rate(step)`` if given); yield (step, mean training loss) after each.

    A stop (SIGINT / SIGTERM) is taken before a step: ``on_stop(last finished step)`` runs
    (e.g. to checkpoint it), then ``Stopped`` is raised. A non-finite loss raises
    ``NonFiniteLossError`` naming the step, ``what`` ran (e.g. the job's tags) and what is
    ``kept``. Under ``torch.distributed`` every rank draws the same meta-batch and trains on its
    own shard of it, the gradients are averaged, and the ranks stop at the same step.
    """
    rank, world_size = rank_and_world_size()
    device = next(learner.parameters()).device
    for step in steps:
        try:
            raise_if_stopped(device)  # agreed between ranks
        except Stopped:
            if on_stop is not None:
                on_stop(step - 1)
            raise
        optimizer.zero_grad()
        tasks = meta_batch(step)
        if world_size > 1:
            tasks = shard_tasks(tasks, rank, world_size)
        failed = None
        try:
            losses = learner.meta_backward(tasks)
        except NonFiniteLossError as error:  # it names the tasks; raised below, by step, once
            failed, losses = error, error.losses  # every rank joins the all_reduce first
        mean = losses.detach().mean()
        if world_size > 1:  # the whole meta-batch's loss, on every rank (so all stop on NaN)
            dist.all_reduce(mean)
            mean /= world_size
        loss = mean.item()
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite training loss {loss} at step {step} ({what}); {kept}", losses
            ) from failed
        if world_size > 1:
            average_gradients(learner)
        if learning_rate is not None:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step) * group.get("lr_scale", 1.0)
        optimizer.step()
        yield step, loss


Job = Callable[..., dict[str, Any]]


def _run_in_processes(
    todo: Sequence[Tags],
    run: Job,
    workers: int,
    logs: tuple[Path, Path | None],
    record: Callable[[dict[str, Any]], None],
    bar: tqdm,
    steps_of: Callable[[Tags], int],
) -> None:
    """Run jobs in a pool of ``workers`` processes; record each entry as it arrives. If a job
    fails, the jobs not yet started are cancelled, the running ones still recorded, and the
    first error raised. If the run is stopped (SIGINT, SIGTERM), the workers are ended at once
    and their jobs left to ``--resume`` (from their checkpoints)."""
    context = multiprocessing.get_context("spawn")  # fork is unsafe with torch's threads
    failure: BaseException | None = None
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker)
    try:
        futures = {pool.submit(_run_logged, run, tags, *logs): tags for tags in todo}
        running = set(futures)
        while running:  # polled, so that a stop is seen while the workers run
            finished, running = wait(running, timeout=0.2, return_when=FIRST_COMPLETED)
            for future in finished:
                try:
                    record(future.result())
                except CancelledError:
                    continue
                except Exception as error:  # re-raised below, once the running jobs are recorded
                    failure = failure or error
                    for pending in futures:
                        pending.cancel()
                bar.update(steps_of(futures[future]))
            raise_if_stopped()
    except BaseException:  # stopped: end the workers rather than wait for their jobs
        workers_alive = list(getattr(pool, "_processes", {}).values())  # no public handle
        pool.shutdown(wait=False, cancel_futures=True)
        for process in workers_alive:
            process.terminate()
        raise
    pool.shutdown()
    if isinstance(failure, BrokenProcessPool):
        raise RunFailedError(
            "a worker process died (killed, or out of memory); the finished jobs and the last "
            "checkpoint of the others are kept: run the same command with --resume to continue"
        ) from None
    if failure is not None:
        raise failure


def _init_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the main process, which ends us
    torch.set_num_threads(1)
    reuse_freed_memory()


def _run_logged(run: Job, tags: Tags, metrics_path: Path, board: Path | None) -> dict[str, Any]:
    """A job in a worker process: its own handle on the shared metrics log (line appends)."""
    with MetricsLog(metrics_path, board) as log:
        return run(tags, log=log, advance=lambda steps: None)
