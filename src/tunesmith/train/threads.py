"""Thread policy: as many threads as cores this process may use, with passive OpenMP waiting.

With spinning waits (the OpenMP default) a busy neighbour on one of two cores made steps 5-8x
slower here; passive waiting costs nothing measurable when the machine is quiet. OMP_WAIT_POLICY
must be set before torch loads OpenMP, so the CLI sets it at import time (`cli/main.py`).
"""
from __future__ import annotations

import os

import torch


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def configure_threads(requested: int | None) -> int:
    n = requested or available_cores()
    torch.set_num_threads(n)
    return n
