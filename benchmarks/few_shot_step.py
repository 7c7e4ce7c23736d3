"""Time per outer step of the few-shot paper protocol, and the projected wall time of its preset.

    python -m benchmarks.few_shot_step [--device auto|cpu|cuda] [--repeats 10] [--rounds 3]
        [--full] [--preset cpu|cpu-long|paper] [--paths loop grouped ...]

Omniglot 5-way 1-shot as the ``paper`` preset runs it: Conv-4 with 64 channels, 32 tasks per
step, 15 queries per class, 1 inner step, second order, Adam; the episodes are sampled and
augmented on the device from the real Omniglot file. For MAML and MSR on each path:
- ``loop``: one task at a time, backward after each;
- ``vmap``: the meta-batch as one batched computation (``torch.func``);
- ``grouped``: the meta-batch as one grouped computation, tasks folded into the channels
  (``msr.grouped``; the few-shot driver's default);
- ``higher``: a per-task loop through ``higher``'s differentiable SGD (``msr.testing``), the
  straightforward reference;
- ``compile``: ``torch.compile`` of the loop's outer step, where torch can compile it;
- ``tf32`` (CUDA only): the loop with TF32 matmuls and convolutions, for its speed alone; how
  far it moves the meta-gradient is ``benchmarks.precision``'s to say. The drivers keep fp32.
Each (method, path) runs in a fresh process: the median of ``--repeats`` steps after 2 warm-up
steps, and the peak memory the steps need above the loaded model and data (CUDA: peak allocated;
CPU: peak resident-set growth, which includes one-time library buffers), then
the projection of the preset's 60,000 steps (training only: evaluation adds ~2%). A method's
paths are measured ``--rounds`` times, round-robin, each time in a fresh process, so that a slow
spell of a shared machine hits every path alike: the time is the median over rounds, a speed-up
the median of the ratios measured within each round. On the CPU the
setting is scaled (16 channels, 4 tasks, 5 queries) so that the whole run takes minutes, unless
``--full``; the projection is then of that scaled setting. ``--preset`` times a few-shot preset's
setting instead (e.g. ``cpu-long``: 32 channels, 4 tasks, 5 queries), projected over its steps.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from experiments.few_shot import build_learner, data_roots_beside_checkout, load_splits
from experiments.presets import FEW_SHOT, FewShotConfig
from msr import TaskBatch
from msr.data import ImageClasses, augment_images, find_omniglot, sample_episodes
from msr.devices import resolve_device, reuse_freed_memory
from msr.streams import keyed_generator
from msr.testing import higher_meta_backward

REPO_ROOT = Path(__file__).resolve().parents[1]  # benchmarks run from the repository

METHODS = ("maml", "msr")
PATHS = ("loop", "vmap", "grouped", "higher", "compile", "tf32")
WAYS, SHOTS = 5, 1
SCALED = {"hidden": 16, "meta_batch": 4, "queries": 5}


def benchmark_config(device: torch.device, full: bool) -> FewShotConfig:
    """The paper preset's setting; on the CPU scaled down (``SCALED``) unless ``full``."""
    paper = FEW_SHOT["omniglot"]["paper"]
    return paper if full or device.type == "cuda" else replace(paper, **SCALED)


def setting_name(cfg: FewShotConfig) -> str:
    """How the reports name ``cfg``: the paper setting, or the scaled one."""
    return "paper setting" if cfg == FEW_SHOT["omniglot"]["paper"] else f"scaled setting {SCALED}"


def omniglot_train(device: torch.device) -> ImageClasses:
    """The Omniglot training classes the benchmarks sample from, put on ``device`` once."""
    return load_splits("omniglot", find_omniglot(data_roots_beside_checkout()), 28, device)[0]


def episodes(
    classes: ImageClasses, cfg: FewShotConfig, index: int, device: torch.device
) -> TaskBatch:
    """Outer step ``index``'s meta-batch, sampled and augmented on ``device`` as the driver does."""
    generator = keyed_generator(0, index, device)
    return sample_episodes(
        classes, cfg.meta_batch, WAYS, SHOTS, cfg.queries, generator, augment_images
    )


def measure(method: str, path: str, cfg: FewShotConfig, device: torch.device, repeats: int):
    """(median ms per outer step, peak MiB of a step) of one method on one path."""
    torch.manual_seed(0)
    classes = omniglot_train(device)
    batching = path if path in ("vmap", "grouped") else "loop"
    learner = build_learner(method, 1, WAYS, replace(cfg, batching=batching))
    learner.to(device)
    optimizer = torch.optim.Adam(learner.parameters(), lr=cfg.outer_lr)
    if path == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    def outer_step(index: int) -> None:
        optimizer.zero_grad()
        tasks = episodes(classes, cfg, index, device)
        if path == "higher":
            higher_meta_backward(learner, tasks)
        else:
            learner.meta_backward(tasks)
        optimizer.step()

    step = torch.compile(outer_step) if path == "compile" else outer_step
    times = []
    baseline = _reset_peak(device)  # the peak covers the first step's allocations too
    for index in range(repeats + 2):
        _synchronize(device)
        start = time.perf_counter()
        step(index)
        _synchronize(device)
        if index >= 2:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times), _peak_mib(device, baseline)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> float:
    """Start a new peak-memory mark; returns the baseline (MiB) it is measured from."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    with open("/proc/self/clear_refs", "w") as refs:  # resets VmHWM to the current RSS (Linux)
        refs.write("5")
    return _status_mib("VmRSS")


def _peak_mib(device: torch.device, baseline: float) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20 - baseline
    return _status_mib("VmHWM") - baseline


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as status:
        return int(re.search(key + r":\s+(\d+)", status.read()).group(1)) / 1024


def run_isolated(method: str, path: str, args: argparse.Namespace) -> dict[str, Any]:
    """``measure`` in a fresh process (clean memory marks and compile caches)."""
    command = [
        sys.executable, "-m", "benchmarks.few_shot_step", "--one", method, path,
        "--device", args.device, "--repeats", str(args.repeats), *(["--full"] if args.full else []),
        *(["--preset", args.preset] if args.preset else []),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    if done.returncode:
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no message"
        return {"error": last[:160]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One path's rounds as one row: the median time, the largest peak, every round's time."""
    failed = [row for row in rounds if "error" in row]
    if failed:
        return failed[0]
    times = [row["ms"] for row in rounds]
    peak = max(row["peak_mib"] for row in rounds)
    return {"ms": statistics.median(times), "peak_mib": peak, "rounds_ms": times}


def grouped_speedups(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, float]:
    """How many times faster ``grouped`` is than each slower path: the median over rounds of
    the ratio within a round (both paths measured minutes apart, on the same machine state)."""
    speedups = {}
    for slow in ("loop", "higher", "vmap"):
        ratios = [
            measured[slow]["ms"] / measured["grouped"]["ms"]
            for measured in rounds
            if "ms" in measured.get(slow, {}) and "ms" in measured.get("grouped", {})
        ]
        if ratios:
            speedups[slow] = statistics.median(ratios)
    return speedups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--rounds", type=int, default=3, help="fresh processes per (method, path), round-robin"
    )
    parser.add_argument("--full", action="store_true", help="the paper setting on the CPU too")
    parser.add_argument(
        "--preset", choices=sorted(FEW_SHOT["omniglot"]), help="time this preset's setting instead"
    )
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1 or args.rounds < 1:
        parser.error(f"--repeats and --rounds must be positive, got {args.repeats}, {args.rounds}")
    device = resolve_device(args.device)
    cfg = FEW_SHOT["omniglot"][args.preset] if args.preset else benchmark_config(device, args.full)
    projected = cfg.steps if args.preset else FEW_SHOT["omniglot"]["paper"].steps
    if args.one:
        reuse_freed_memory()  # as the drivers run
        ms, peak = measure(*args.one, cfg, device, args.repeats)
        print(json.dumps({"ms": ms, "peak_mib": peak}))
        return
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    setting = f"preset {args.preset}" if args.preset else setting_name(cfg)
    print(
        f"Omniglot {WAYS}-way {SHOTS}-shot outer step on {name} ({setting}; torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads), median of {args.repeats} steps "
        f"in each of {args.rounds} rounds:"
    )
    print(f"method  path      ms/step   peak MiB   {projected:,} steps")
    report: dict[str, Any] = {"device": name, "config": asdict(cfg), "rows": {}}
    paths = [p for p in args.paths if p != "tf32" or device.type == "cuda"]
    speedups: dict[str, dict[str, float]] = {}
    for method in METHODS:
        rounds = [{path: run_isolated(method, path, args) for path in paths}
                  for _ in range(args.rounds)]  # fmt: skip
        for path in paths:
            row = summarize([measured[path] for measured in rounds])
            report["rows"][f"{method}/{path}"] = row
            if "error" in row:
                print(f"{method:7s} {path:8s} fails: {row['error']}")
                continue
            hours = row["ms"] * projected / 3.6e6
            print(f"{method:7s} {path:8s} {row['ms']:8.1f} {row['peak_mib']:10.1f} {hours:9.2f} h")
        speedups[method] = grouped_speedups(rounds)
    for method, ratios in speedups.items():
        for slow, ratio in ratios.items():
            print(f"{method}: grouped is {ratio:.2f}x faster than {slow}")
    report["speedups"] = speedups
    print(json.dumps(report))


if __name__ == "__main__":
    main()
