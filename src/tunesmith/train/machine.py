"""Machine setup for training on CPUs: threads and the memory allocator.

Threads: as many as cores this process may use, waiting with a short spin (tunesmith/native_env.py:
long spinning waits made steps 1.5-8x slower with a busy neighbour core, passive waits cost 10-25 %
on an idle machine). It must be set before torch loads OpenMP, so the CLI sets it at import time.

Allocator: glibc serves blocks above a (dynamic, at most 32 MB) threshold with fresh mmaps and
gives freed heap memory back to the OS, so every training step page-faults its activation
buffers in again (~60k faults and 10-20 % of a SmolLM2 step here). Keeping blocks up to 32 MB
on the heap and never trimming it makes steady-state steps fault-free.
"""
from __future__ import annotations

import ctypes
import os
import sys

import torch

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def configure_threads(requested: int | None) -> int:
    n = requested or available_cores()
    torch.set_num_threads(n)
    return n


def keep_heap_memory() -> bool:
    """Tell glibc malloc to keep freed memory (Linux only; a no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl or another libc
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
    ok &= libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    ok &= libc.mallopt(_M_TOP_PAD, 64 * 1024 * 1024)
    return bool(ok)
