"""Optimizer and learning-rate schedule."""
from __future__ import annotations

import math

import torch


def lr_at(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 1.0 - progress) if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps(warmup: float, total_steps: int) -> int:
    return int(warmup) if warmup >= 1 else int(round(warmup * total_steps))


def make_optimizer(name: str, params, lr: float, weight_decay: float, log) -> torch.optim.Optimizer:
    """`adamw` (torch, fused) or a bitsandbytes 8-bit / paged AdamW. Paged optimizers page state to
    host memory under GPU pressure; on CPU there is nothing to page to, so the plain one runs."""
    if name == "adamw":
        return adamw(params, lr, weight_decay)
    import bitsandbytes as bnb

    if name.startswith("paged_") and not torch.cuda.is_available():
        log(f"train.optimizer={name}: paging needs a GPU; using {name.removeprefix('paged_')} on CPU")
        name = name.removeprefix("paged_")
    cls = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw": bnb.optim.PagedAdamW,
           "paged_adamw8bit": bnb.optim.PagedAdamW8bit}.get(name)
    if cls is None:
        return adamw(params, lr, weight_decay)
    return cls(params, lr=lr, weight_decay=weight_decay)


def adamw(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    try:  # the fused kernel is fastest on CPU and GPU alike; older builds lack it for some dtypes
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def plan_steps(cfg, n_train: int, processes: int = 1, repeats: int = 1) -> tuple[int, int]:
    """(steps per epoch, total optimizer steps) for `n_train` training examples, each batch of them trained `repeats`
    consecutive steps (online RL's several updates per batch of rollouts)."""
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * processes
    steps_per_epoch = max(1, math.ceil(n_train / per_step)) * repeats
    return steps_per_epoch, cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))


def budget_steps(budget_seconds: float, cap: int, steps_done: int, seconds_so_far: float, first_step_seconds: float) -> int:
    """Total optimizer steps that fit `budget_seconds` at the pace measured so far (the first step,
    which pays for memory allocation, is left out of the pace once there are others), at most `cap`."""
    if steps_done >= 2:
        pace = (seconds_so_far - first_step_seconds) / (steps_done - 1)
    else:
        pace = seconds_so_far / max(1, steps_done)
    remaining = max(0.0, budget_seconds - seconds_so_far)
    return max(steps_done, min(cap, steps_done + int(remaining / max(pace, 1e-9))))
