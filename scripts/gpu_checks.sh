#!/usr/bin/env bash
# The GPU checks of docs/performance.md ("Devices and GPUs") as one command for a machine with a CUDA GPU that
# has its own python3 and torch (>= 2.11; nothing is installed: run from the repository root).
#
#   bash scripts/gpu_checks.sh DEST
#
# 1. the `cuda` tests (tests/library/test_cuda.py);
# 2. how far TF32 and bf16 move the meta-gradient (python -m benchmarks.precision);
# 3. the few-shot step benchmark at the paper's scale (python -m benchmarks.few_shot_step --full);
# 4. the Omniglot 5-way 1-shot `paper` preset of MAML and of MSR, PAPER_SECONDS each (default
#    55), stopped by SIGTERM (which checkpoints the step reached) and continued with --resume
#    when runs/gpu-paper-<method>/ already holds a run (carry it there to go on);
# 5. with 2 or more GPUs, a 2-rank stretch of the few-shot paper preset (MSR) under torchrun
#    (nccl, one GPU per rank, the meta-batch and evaluation split between them), DDP_SECONDS
#    (default 60), stopped and resumed like 4; with one GPU it says so and skips.
# Logs and paper_runs.tgz (runs/gpu-paper-*: checkpoints, metrics) go to DEST: 7 files, within
# the device tool's 8. DEVICE (default cuda) and the stage limits TESTS_SECONDS (180),
# PRECISION_SECONDS (45) and BENCHMARK_SECONDS (200) can be set; the defaults end within 9
# minutes on one GPU, inside one 10-minute device call (with 2+ GPUs lower PAPER_SECONDS). The omniglot file is read from ../shared as on the
# development machines; where that is absent, from shared/ inside the checkout (the device tool
# carries it), made beforehand with
#   mkdir -p shared/data/omniglot && cp -r ../shared/data/omniglot/{omniglot_28x28_lanczos.npz,splits} \
#       shared/data/omniglot/
set -uo pipefail
DEST="$(mkdir -p "${1:?usage: bash scripts/gpu_checks.sh DEST}" && cd "$1" && pwd)"
cd "$(dirname "$0")/.."
PY="${PY:-python3}"
DEVICE="${DEVICE:-cuda}"
export PYTHONUNBUFFERED=1

if [ ! -e ../shared ]; then
    if [ ! -f shared/data/omniglot/omniglot_28x28_lanczos.npz ] || [ ! -d shared/data/omniglot/splits ]; then
        echo "gpu_checks: no ../shared, and shared/data/omniglot/ in the checkout lacks" \
            "omniglot_28x28_lanczos.npz or splits/ (see the head of this script)" >&2
        exit 2
    fi
    ln -s "$PWD/shared" ../shared || exit 2
fi
"$PY" - "$DEVICE" <<'EOF' 2>&1 | tee "$DEST/device.txt" || exit 1
import sys
import torch
device = torch.device(sys.argv[1])
if device.type == "cuda" and not torch.cuda.is_available():
    sys.exit("gpu_checks: torch sees no CUDA GPU")
name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
print(f"torch {torch.__version__}, {name}")
EOF

echo "== cuda tests" >&2
timeout "${TESTS_SECONDS:-180}" "$PY" -m pytest -q -p no:cacheprovider --durations=5 \
    -m cuda tests/library/test_cuda.py 2>&1 | tee "$DEST/cuda_tests.log"

echo "== precision" >&2
timeout "${PRECISION_SECONDS:-45}" "$PY" -m benchmarks.precision --device "$DEVICE" \
    2>&1 | tee "$DEST/precision.log"

echo "== few-shot step benchmark" >&2
full=$([ "$DEVICE" = cpu ] || echo --full)
timeout "${BENCHMARK_SECONDS:-200}" "$PY" -m benchmarks.few_shot_step --device "$DEVICE" $full --rounds 1 \
    2>&1 | tee "$DEST/benchmark.log"

for method in maml msr; do
    echo "== paper preset, $method, ${PAPER_SECONDS:-55} s" | tee -a "$DEST/paper_runs.log" >&2
    out="runs/gpu-paper-$method"
    resume=$([ -f "$out/results.json" ] && echo --resume)
    timeout --preserve-status -s TERM "${PAPER_SECONDS:-55}" \
        "$PY" -m experiments.few_shot --method "$method" --preset paper --device "$DEVICE" \
        --out "$out" $resume 2>&1 \
        | tr '\r' '\n' | grep -v -E '[0-9]+/[0-9]+ \[' | tee -a "$DEST/paper_runs.log"
    echo "exit ${PIPESTATUS[0]} (143: stopped by the time limit, checkpoint kept)" \
        | tee -a "$DEST/paper_runs.log"
done
gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$DEVICE" != cpu ] && [ "$gpus" -ge 2 ]; then
    echo "== 2 ranks under torchrun (nccl), msr, ${DDP_SECONDS:-60} s" | tee "$DEST/ddp_run.log" >&2
    out="runs/gpu-paper-msr-2ranks"
    resume=$([ -f "$out/results.json" ] && echo --resume)
    timeout --preserve-status -s TERM "${DDP_SECONDS:-60}" \
        "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 -m experiments.few_shot \
        --method msr --preset paper --device cuda --out "$out" $resume 2>&1 \
        | tr '\r' '\n' | grep -v -E '[0-9]+/[0-9]+ \[' | tee -a "$DEST/ddp_run.log"
    echo "exit ${PIPESTATUS[0]} (143: stopped by the time limit, checkpoint kept)" \
        | tee -a "$DEST/ddp_run.log"
else
    echo "== 2 ranks under torchrun: skipped, this machine has $gpus CUDA GPU(s) (needs 2)" \
        | tee "$DEST/ddp_run.log" >&2
fi
tar czf "$DEST/paper_runs.tgz" runs/gpu-paper-*
