"""The precision a run trains in: the weights' dtype (`model.dtype`) and, over float32 weights, bfloat16 matmuls
under autocast (`train.mixed_precision`). Both have `auto` values that depend on the machine and the method
(models/load.py: `pick_dtype`, `pick_autocast`), so checkpoints record what a run trained in and a resume on
another machine or backend says when it changes and how to keep the old way.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tunesmith.models import pick_autocast, pick_dtype


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype                 # of the weights
    autocast: torch.dtype | None       # of the matmuls in training forward passes, when not the weights'

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def describe(self) -> str:
        """For the log's `method:` line."""
        return f"{self.dtype_name} weights" + (", bfloat16 matmuls (autocast)" if self.autocast else "")

    def context(self, device: torch.device):
        """Where training forward passes (and what they are compared with) run."""
        return torch.autocast(device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None)

    def settings(self) -> dict:
        """As config values, the form a checkpoint records."""
        return {"model.dtype": self.dtype_name, "train.mixed_precision": "bf16" if self.autocast else "no"}


def choose(cfg, device: torch.device, task: str) -> Precision:
    dtype = pick_dtype(cfg.model.dtype, device, cfg.method.name, task, cfg.train.distributed)
    return Precision(dtype, pick_autocast(cfg.train.mixed_precision, dtype, device, cfg.method.name, task,
                                          cfg.train.distributed))


def resume_note(progress: dict, now: Precision, cfg, step: int) -> str | None:
    """A note when a checkpoint (its `progress`) was trained in another precision than `now`."""
    recorded = progress.get("precision") or ({"model.dtype": progress["dtype"]} if "dtype" in progress else {})
    then = {**now.settings(), **recorded}  # checkpoints before train.mixed_precision recorded the dtype alone
    changed = [k for k, v in now.settings().items() if then[k] != v]
    if not changed:
        return None
    asked = {"model.dtype": cfg.model.dtype, "train.mixed_precision": cfg.train.mixed_precision}
    return (f"note: this run trained in {_name(then)} up to step {step} and goes on in {_name(now.settings())} ("
            + ", ".join(f"{k}={asked[k]}" for k in changed) + "); set "
            + " ".join(f"{k}={then[k]}" for k in changed) + " to keep it")


def _name(settings: dict) -> str:
    """'float32', or 'float32 weights with bfloat16 matmuls'."""
    dtype = settings["model.dtype"]
    return f"{dtype} weights with bfloat16 matmuls" if settings["train.mixed_precision"] == "bf16" else dtype
