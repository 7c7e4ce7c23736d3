"""Outer-step time and peak memory of our MAML paths against a per-task ``higher`` loop.

    python -m benchmarks.meta_step [--repeats 30] [--quick]     (from the repository root)

(a) MSR-FC k=1 (70 -> 68, latent 3), second order, 32 tasks: vmap / per-task loop / higher.
(b) Time per outer step as the meta-batch grows (1..128) and as the latent size grows.
(c) Peak resident memory of each path, each measured in a fresh process.
All timings are medians over ``--repeats`` steps after warm-up, on one thread; ratios are
measured in this run (these machines are shared: compare ratios, not absolute times).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from experiments.synthetic import build_model
from msr import MAML, MSRLinear, TaskBatch
from msr.testing import higher_meta_backward
from synthetic.translation1d import Translation1D

REPO_ROOT = Path(__file__).resolve().parents[1]  # benchmarks run from the repository

PATHS = ("vmap", "loop", "higher")


def make(latent: int = 3) -> tuple[MAML, Translation1D]:
    torch.manual_seed(0)
    data = Translation1D(1)
    model = build_model("MSR-FC", 1, data) if latent == 3 else MSRLinear(70, 68, latent, False)
    return MAML(model), data


def median_step_ms(path: str, tasks: TaskBatch, repeats: int, latent: int = 3) -> float:
    """Median wall time of one outer step (forward, meta-gradient, Adam) in milliseconds."""
    maml, _ = make(latent)
    optimizer = torch.optim.Adam(maml.parameters(), lr=1e-3)
    if path != "higher":
        maml.batching = path  # type: ignore[assignment]
    times = []
    for index in range(repeats + 3):
        start = time.perf_counter()
        optimizer.zero_grad()
        if path == "higher":
            higher_meta_backward(maml, tasks)
        else:
            maml.meta_backward(tasks)
        optimizer.step()
        if index >= 3:  # warm-up
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def batch(size: int) -> TaskBatch:
    data = Translation1D(1)
    return data.sample_train(size, torch.Generator().manual_seed(0))


def peak_memory_mib(path: str, size: int) -> float:
    """Peak RSS growth (MiB) of one outer step of ``path``, in a fresh process (Linux only).

    The kernel's peak-RSS mark (VmHWM) is reset just before the step through
    /proc/self/clear_refs, so imports and data creation do not hide the step's own peak.
    """
    code = (
        "import re, torch\n"
        "torch.set_num_threads(1)\n"
        "from benchmarks.meta_step import batch, make\n"
        "def status(key):\n"
        "    text = open('/proc/self/status').read()\n"
        "    return int(re.search(key + r':\\s+(\\d+)', text).group(1)) / 1024\n"
        f"maml, _ = make()\ntasks = batch({size})\n"
        f"path = {path!r}\n"
        "if path != 'higher':\n    maml.batching = path\n"
        "from msr.testing import higher_meta_backward\n"
        "base = status('VmRSS')\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "higher_meta_backward(maml, tasks) if path == 'higher' else maml.meta_backward(tasks)\n"
        "print(status('VmHWM') - base)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="fewer sizes, for a smoke run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    report: dict[str, object] = {"torch": torch.__version__, "threads": 1}

    tasks = batch(32)
    step = {path: median_step_ms(path, tasks, args.repeats) for path in PATHS}
    report["a_step_ms_32_tasks"] = step
    print("(a) MSR-FC k=1, 32 tasks, second order, median ms per outer step:")
    for path in PATHS:
        print(
            f"    {path:7s} {step[path]:8.2f} ms   higher / {path} = "
            f"{step['higher'] / step[path]:5.1f}x"
        )

    sizes = (1, 8, 32) if args.quick else (1, 2, 4, 8, 16, 32, 64, 128)
    print("(b) ms per outer step by meta-batch size (latent 3):")
    print("    tasks    vmap    loop  loop/vmap")
    scaling = {}
    for size in sizes:
        sized = batch(size)
        row = {p: median_step_ms(p, sized, max(5, args.repeats // 3)) for p in ("vmap", "loop")}
        scaling[size] = row
        print(
            f"    {size:5d} {row['vmap']:7.2f} {row['loop']:7.2f} {row['loop'] / row['vmap']:9.1f}x"
        )
    report["b_by_meta_batch"] = scaling
    latents = (3, 30) if args.quick else (3, 30, 100, 300)
    print("(b) ms per outer step by latent size (32 tasks):")
    by_latent = {}
    for latent in latents:
        row = {
            p: median_step_ms(p, tasks, max(5, args.repeats // 3), latent) for p in ("vmap", "loop")
        }
        by_latent[latent] = row
        print(f"    latent {latent:4d}: vmap {row['vmap']:7.2f}  loop {row['loop']:7.2f}")
    report["b_by_latent"] = by_latent

    memory = {}
    for size in (32, 128):
        print(f"(c) peak RSS growth of one outer step, {size} tasks (fresh process each):")
        memory[size] = {path: peak_memory_mib(path, size) for path in PATHS}
        for path in PATHS:
            print(f"    {path:7s} {memory[size][path]:7.1f} MiB")
    report["c_peak_rss_growth_mib"] = memory
    print(json.dumps(report))


if __name__ == "__main__":
    main()
