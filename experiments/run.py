"""What every experiment runs on: its jobs, the meta-training loop, its results.

An experiment (``Experiment``: one small file per table) says which jobs a command line asks
for, and for each job which data, which model and which metrics (a ``Plan``). This module does
the rest, the same way for every experiment (``experiments.cli.main`` calls it):

- ``run_jobs``: one job per tag combination and seed, in this process or in ``--workers``
  processes, under one progress bar; results.json, the summary, after every job.
- ``run_job``: one job in its folder ``DIR/<job name>``: the meta-batch of step ``s`` from a
  stream keyed by (seed, s), ``outer_steps`` (the only place where outer steps happen), a probe
  logged every ``eval_every`` steps to its metrics.jsonl, its model.pt (the checkpoint) every
  ``checkpoint_every`` steps and at a stop, its result.json last.
- One resume rule: a job is done iff its result.json exists; ``--resume`` keeps those and
  continues every other job from its model.pt, bit for bit. A job of another preset, seed,
  config, data or commit is refused, naming the differing fields; ``--steps`` may grow (a
  finished job then trains on). results.json is written from the jobs, never read back.
"""

from __future__ import annotations

import argparse
import functools
import math
import multiprocessing
import signal
import sys
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
from experiments.rundir import (
    MetricsLog,
    differences,
    provenance,
    read_checkpoint,
    read_results,
    save_checkpoint,
    save_figure,
    write_results,
)
from msr import MAML, EpisodicLearner, SymmetryLayer, TaskBatch, partition_parameters
from msr.devices import reuse_freed_memory
from msr.distributed import average_gradients, rank_and_world_size, shard_tasks
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
    draw: Callable[[dict[str, Any]], Figure | None] | None = None  # its figure
    stream_device: torch.device | str = "cpu"  # where the steps' streams draw


class Experiment:
    """Which data, which model and which metrics: one subclass per table (see the module)."""

    name: str  # experiments.<name>, and the "driver" of its model files
    presets: Mapping[str, RunConfig]
    default_preset = "quick"
    metric = report.MSE  # what its jobs are scored by
    proposed: str | None = None  # the method the others are compared with over seeds
    figure = "U.png"  # the name of a job's figure in its folder

    @property
    def description(self) -> str:
        """What ``--help`` says first: the first line of the experiment's module docstring."""
        return (sys.modules[type(self).__module__].__doc__ or self.name).split("\n")[0]

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
        the data the run reads, as {"path", "sha256"} (``msr.data.fingerprint``): results.json
        records it, each job its fingerprint, which ``--resume`` checks; None for data drawn
        from the seed."""
        return None

    def jobs(self, args: argparse.Namespace) -> list[Tags]:
        """The tags of every job the command line asks for, without the seed."""
        raise NotImplementedError

    def job_name(self, tags: Tags) -> str:
        """The name of the job's folder in the run directory."""
        return "_".join(str(v) for k, v in tags.items() if k != "seed") + f"_s{tags['seed']}"

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
    """Run every job (its tags and each seed) under one progress bar, each in its folder
    ``args.out/<job name>``; results.json, the summary of the finished jobs, is rewritten after
    every job. With ``--resume`` a job whose result.json is there is kept (unless ``--steps``
    grew: it trains on) and any other continues from its model file (``run_job``); every job
    seeds itself, so the outcome equals an uninterrupted run's. With ``args.workers`` > 1 the
    jobs run in that many processes (one thread each), with the same results."""
    jobs = [{**tags, "seed": seed} for seed in args.seeds for tags in experiment.jobs(args)]
    summary = {
        **provenance(args.seeds, args.preset),
        "config": asdict(cfg),
        "data": data,  # what experiment.check found
        "proposed": experiment.proposed,  # the method experiments.report compares by default
    }
    identity = {
        "driver": experiment.name,
        "preset": args.preset,
        "data_sha256": data and data["sha256"],  # the data it read (None: drawn from the seed)
        **{k: summary[k] for k in ("torch_version", "git_sha")},
    }
    if args.resume and not (args.out / "results.json").exists():
        raise RunError(f"--resume given but {args.out / 'results.json'} does not exist")
    entries: dict[int, dict[str, Any]] = {}  # by the job's place in ``jobs``
    for place, tags in enumerate(jobs):
        folder = args.out / experiment.job_name(tags)
        ours = {**identity, **_own(tags), "config": asdict(cfg)}
        if args.resume and (found := _finished(folder, ours)):
            entries[place] = found

    def summarize() -> None:
        runs = [entries[i] for i in sorted(entries)]
        summary.update(
            runs=runs,
            aggregate=report.aggregate_seeds(runs, list(jobs[0]), experiment.metric.field),
            wall_s=sum(run["wall_s"] for run in runs),  # the jobs' training, resumes included
        )
        write_results(args.out / "results.json", summary)

    def record(place: int, entry: dict[str, Any]) -> None:
        entries[place] = entry
        summarize()

    summarize()  # a stop from here on can --resume
    todo = [place for place in range(len(jobs)) if place not in entries]
    steps = [cfg.steps + experiment.tuning_steps(tags, cfg) for tags in jobs]
    with tqdm(
        total=sum(steps),
        initial=sum(steps) - sum(steps[i] for i in todo),
        desc=experiment.name,
        unit="step",
        disable=rank_and_world_size()[0] > 0,
    ) as bar:
        run = functools.partial(
            run_job, experiment, cfg=cfg, args=args, device=device, identity=identity
        )
        if args.workers > 1:
            _run_in_processes([(i, jobs[i]) for i in todo], run, args.workers, record, bar, steps)
        for place in todo if args.workers == 1 else ():
            bar.set_postfix_str(" ".join(str(v) for v in jobs[place].values()))
            record(place, run(jobs[place], advance=bar.update))
    return summary


def _own(tags: Tags) -> dict[str, Any]:
    return {"seed": tags["seed"], "tags": tags}


def _finished(folder: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The result of the job in ``folder`` if it finished at the steps of ``identity``'s
    config; None if it did not finish, or finished at fewer steps (it trains on). A result of
    another job, preset, config (but ``steps``), data or commit is a ``RunError``."""
    path = folder / "result.json"
    if not path.exists():
        return None
    saved = read_results(path)
    steps = saved["result"]["steps"]
    _check_identity(path, saved["identity"], identity, steps)
    return saved["result"] if steps == identity["config"]["steps"] else None


def _check_identity(path: Path, theirs: dict[str, Any], ours: dict[str, Any], steps: int) -> None:
    """Refuse ``path`` unless it is this job's (``ours``: every field but ``config.steps``
    agrees) and trained at most our steps (``steps`` it has trained)."""
    limit = ours["config"]["steps"]
    theirs = {k: theirs.get(k) for k in ours}
    if isinstance(theirs["config"], dict):
        theirs["config"] = {**theirs["config"], "steps": limit}
    different = differences(theirs, ours)
    if "data_sha256" in different:
        raise RunError(
            f"{path} trained on other data than this run reads (their fingerprints differ): "
            "resume with that data (results.json names its path)"
        )
    if different:
        raise RunError(f"{path} belongs to another run; differing (theirs, ours): {different}")
    if limit < steps:
        raise RunError(
            f"{path} has trained {steps} steps, more than --steps {limit}: resume with at "
            "least as many (or start a new run)"
        )


def run_job(
    experiment: Experiment,
    tags: Tags,
    *,
    cfg: RunConfig,
    args: argparse.Namespace,
    device: torch.device,
    identity: dict[str, Any],
    advance: Callable[[int], None] = lambda steps: None,
) -> dict[str, Any]:
    """Tune, meta-train and score one job in its folder; its result (results.json's entry).

    The learner trains ``cfg.steps`` outer steps with Adam (and the preset's cosine schedule);
    step ``s`` on ``plan.meta_batch`` of a stream keyed by (seed, ``s``). Every
    ``cfg.eval_every`` steps and at the last, ``plan.probe()`` goes to the job's metrics.jsonl;
    every ``cfg.checkpoint_every`` steps, at the last and at a stop, the learner, optimizer and
    step go to its model.pt (``identity``: what rebuilds the model). If model.pt exists the job
    continues from it, bit for bit (a stop during a probe leaves the step trained and its probe
    owed; the resumed job probes it first). result.json is written last: the job is done iff
    it exists."""
    seed, folder = tags["seed"], args.out / experiment.job_name(tags)
    if folder.is_symlink():
        raise RunError(f"{folder} is a symbolic link: a run follows no link inside --out")
    identity = {**identity, **_own(tags)}
    (folder / "result.json").unlink(missing_ok=True)  # finished at fewer steps: it trains on
    tuned, notes = experiment.tune(tags, cfg, device, advance)
    torch.manual_seed(seed)
    plan = experiment.plan(tags, tuned, args, device)
    learner, checkpoint = plan.learner, folder / "model.pt"
    optimizer = outer_optimizer(learner, tuned)
    state = _load_checkpoint(checkpoint, {**identity, "config": asdict(tuned)}, learner, optimizer)
    first = 1 if state is None else state["step"] + 1
    start = time.perf_counter() - (0.0 if state is None else state["elapsed_s"])

    def save(step: int, unvalidated: float | None = None, elapsed: float | None = None) -> None:
        progress = {
            "config": asdict(tuned),
            "step": step,
            "elapsed_s": time.perf_counter() - start if elapsed is None else elapsed,
            "unvalidated": unvalidated,  # the train loss of a step whose probe was cut off
        }
        state = {"optimizer": optimizer.state_dict()}
        save_checkpoint(checkpoint, learner, {**identity, **progress}, state)

    board = args.out / "tensorboard" / folder.name if args.tensorboard else None
    with MetricsLog(folder / "metrics.jsonl", board) as log:

        def probe(step: int, train_loss: float) -> None:
            try:
                scores = plan.probe()
            except Stopped:  # the step is trained: keep it, and owe its probe
                save(step, unvalidated=train_loss)
                raise
            elapsed = time.perf_counter() - start
            log.write(**tags, step=step, train_loss=train_loss, **scores, elapsed_s=elapsed)
            if log.board is not None:
                log.figures(step, sharing_figures(learner))

        if state is None:
            save(0)  # a job stopped before its first checkpoint resumes from here
        else:
            owed = state["unvalidated"] is not None  # the step's probe was cut off: redo it
            log.continue_from(state["step"] + (not owed))
            if owed:
                probe(state["step"], state["unvalidated"])
                save(state["step"])
        advance(first - 1)
        kept = f"the last checkpoint ({checkpoint}) and the finished jobs are kept"
        for step, train_loss in training(
            plan, tuned, seed, optimizer, first, what=str(tags), kept=kept, on_stop=save
        ):
            advance(1)
            if step % tuned.eval_every == 0 or step == tuned.steps:
                probe(step, train_loss)
            if step % tuned.checkpoint_every == 0 or step == tuned.steps:
                save(step)
        wall = time.perf_counter() - start
        entry = {**tags, **notes, **plan.result(), "steps": cfg.steps, "wall_s": wall}
        entry["device"] = str(device)
        save(tuned.steps, elapsed=wall)  # as the job leaves the learner (e.g. its test-time steps)
        metric = experiment.metric
        final = entry[metric.field] * metric.board_scale
        log.hparams({**asdict(tuned), **tags}, {f"final/{metric.field}": final})
    if plan.draw is not None and (figure := plan.draw(entry)) is not None:
        save_figure(figure, folder / experiment.figure)
    job = {**identity, "config": asdict(cfg)}  # the run's config (``tune``'s choice: in entry)
    write_results(folder / "result.json", {"identity": job, "result": entry})
    return entry


def training(
    plan: Plan,
    cfg: RunConfig,
    seed: int,
    optimizer: torch.optim.Optimizer,
    first: int = 1,
    *,
    what: str = "",
    kept: str = "nothing of it is kept",
    on_stop: Callable[[int], None] | None = None,
) -> Iterator[tuple[int, float]]:
    """``outer_steps`` of ``plan.learner`` from step ``first`` to ``cfg.steps``, step ``s`` on
    ``plan.meta_batch`` of a stream keyed by (``seed``, ``s``), at the preset's cosine
    schedule (``what``, ``kept``, ``on_stop``: as ``outer_steps`` takes them)."""
    floor = cfg.outer_lr * cfg.final_lr_fraction

    def learning_rate(step: int) -> float:
        return floor + (cfg.outer_lr - floor) * (1 + math.cos(math.pi * (step - 1) / cfg.steps)) / 2

    return outer_steps(
        plan.learner,
        optimizer,
        lambda step: plan.meta_batch(keyed_generator(seed, step, plan.stream_device)),
        range(first, cfg.steps + 1),
        what=what,
        kept=kept,
        learning_rate=None if cfg.final_lr_fraction == 1 else learning_rate,
        on_stop=on_stop,
    )


def outer_optimizer(learner: EpisodicLearner, cfg: RunConfig) -> torch.optim.Optimizer:
    """Adam over ``outer_groups``, at the outer lr."""
    return torch.optim.Adam(outer_groups(learner, cfg), lr=cfg.outer_lr)


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
    path: Path,
    identity: dict[str, Any],
    learner: EpisodicLearner,
    optimizer: torch.optim.Optimizer,
) -> dict[str, Any] | None:
    """The progress in the model file at ``path`` (None if there is none: step, elapsed_s,
    unvalidated), checked to be this job's, loaded into ``learner`` and ``optimizer``."""
    if not path.exists():
        return None
    saved = read_checkpoint(path, map_location=next(learner.parameters()).device)
    state = saved["metadata"]
    _check_identity(path, state, identity, state["step"])
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
    todo: Sequence[tuple[int, Tags]],
    run: Job,
    workers: int,
    record: Callable[[int, dict[str, Any]], None],
    bar: tqdm,
    steps: Sequence[int],
) -> None:
    """Run jobs (their place and tags) in a pool of ``workers`` processes; record each entry as
    it arrives. If a job fails, the jobs not yet started are cancelled, the running ones still
    recorded, and the first error raised. If the run is stopped (SIGINT, SIGTERM), the workers
    are ended at once and their jobs left to ``--resume`` (from their checkpoints)."""
    context = multiprocessing.get_context("spawn")  # fork is unsafe with torch's threads
    failure: BaseException | None = None
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker)
    try:
        futures = {pool.submit(run, tags): place for place, tags in todo}
        running = set(futures)
        while running:  # polled, so that a stop is seen while the workers run
            finished, running = wait(running, timeout=0.2, return_when=FIRST_COMPLETED)
            for future in finished:
                try:
                    record(futures[future], future.result())
                except CancelledError:
                    continue
                except Exception as error:  # re-raised below, once the running jobs are recorded
                    failure = failure or error
                    for pending in futures:
                        pending.cancel()
                bar.update(steps[futures[future]])
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
