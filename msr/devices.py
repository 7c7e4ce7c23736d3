"""Where a model runs: the device a name asks for (checked, TF32 off on CUDA) and glibc's
allocator set to keep freed memory for the next training step."""

from __future__ import annotations

import ctypes

import torch

DEVICE_HELP = "auto (CUDA when available), cpu, cuda or cuda:N"


def resolve_device(spec: str) -> torch.device:
    """The device ``spec`` names (``DEVICE_HELP``), checked to exist on this machine.

    On CUDA it also turns TF32 off for matmuls and cuDNN convolutions (torch allows it in
    convolutions by default), so that a model computes in full fp32, as on the CPU (the
    drivers and benchmarks choose their device with it).
    """
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {spec!r}; expected {DEVICE_HELP}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {spec!r}: CUDA is not available here (torch {torch.__version__}, "
                f"built for CUDA {torch.version.cuda}); use 'cpu' or 'auto'"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {spec!r}: this machine has {count} CUDA device(s)")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        if device.index is None:  # recorded as e.g. cuda:0 in results.json
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def reuse_freed_memory() -> bool:
    """Make glibc's malloc serve every allocation from its heap and keep freed memory for reuse.

    By default glibc maps each allocation above a threshold afresh and hands it back on free, so
    a training step that allocates the same multi-MB tensors every time page-faults them all in
    again: measured on a D8 meta-step (32 tasks, 48 channels), 120k minor faults and 60% of the
    time in the kernel; with this, 66 faults and 292 -> 101 ms. The cost: the process keeps its
    peak memory. The drivers call it at start; returns False where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))
