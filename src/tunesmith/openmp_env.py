"""How OpenMP threads wait, set before torch loads its OpenMP runtime (so: no torch import here).

Measured on 2 cores (SmolLM2 LoRA, docs/performance.md): spinning waits (the GNU OpenMP default,
~3 ms of spinning) are fastest on an idle machine but make steps 1.5x slower when a neighbour
process keeps one core busy; passive waits (sleep at once) survive the neighbour but cost ~10 %
of an SFT step and ~25 % of a DPO step (many small operations) on an idle machine. A short spin
(GNU: GOMP_SPINCOUNT=1000, which takes precedence over OMP_WAIT_POLICY) measured as fast as spinning
when idle and as robust as passive with the neighbour; OMP_WAIT_POLICY=PASSIVE stays for other
OpenMP runtimes (Intel, LLVM). A user's own settings win.
"""
import os

OPENMP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000"}


def set_openmp_defaults() -> None:
    for key, value in OPENMP_DEFAULTS.items():
        os.environ.setdefault(key, value)
