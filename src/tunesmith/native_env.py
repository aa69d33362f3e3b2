"""Settings for torch's native libraries (OpenMP, oneDNN), set before torch loads them (so: no torch import here).
A user's own settings win.

OpenMP thread waiting, measured on 2 cores (SmolLM2 LoRA, docs/performance.md): spinning waits (the GNU
OpenMP default, ~3 ms of spinning) are fastest on an idle machine but make steps 1.5x slower when a
neighbour process keeps one core busy; passive waits (sleep at once) survive the neighbour but cost ~10 %
of an SFT step and ~25 % of a DPO step (many small operations) on an idle machine. A short spin
(GNU: GOMP_SPINCOUNT=1000, which takes precedence over OMP_WAIT_POLICY) measured as fast as spinning
when idle and as robust as passive with the neighbour; OMP_WAIT_POLICY=PASSIVE stays for other
OpenMP runtimes (Intel, LLVM).

oneDNN kernel cache: torch runs bfloat16/float16 matmuls on a CPU through oneDNN, which compiles a kernel per
matrix shape and keeps the last 1024. Training sees a new token count in nearly every pass, and each count
needs a dozen kernels, so the cache fills within ~100 steps and every later miss recompiles: a bfloat16 LoRA
run on the TL;DR slowed from 526 to 410 tokens/s over 156 steps; with 16384 kernels kept it held 527 (1.31x float32)
(docs/performance.md). float32 matmuls do not go through oneDNN here. oneDNN reads the setting when it first
compiles a kernel, so it still takes effect after `import torch`, before the first bfloat16 matmul.
"""
import os

NATIVE_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "16384"}


def set_native_defaults() -> None:
    for key, value in NATIVE_DEFAULTS.items():
        os.environ.setdefault(key, value)
