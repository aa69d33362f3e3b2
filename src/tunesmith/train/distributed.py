"""Data-parallel training on torch.distributed (gloo on CPU, NCCL on GPU), launched by torchrun.

Every rank builds the same global step plan (it is a pure function of seed and epoch), takes its
share of each step's examples, and normalises its loss by the label tokens of the *whole global
step* -- computable on every rank without communication, because every rank holds the tokenized
data. After backward the gradients are summed across ranks in one flat all-reduce (what DDP does,
minus bucketing), so every rank applies the identical update and the result equals one process
with the same global batch. Rank 0 alone writes files; stopping (Ctrl-C, time budget) is decided
collectively so no rank is left waiting in a collective.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def setup(device: torch.device) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def shard(step_examples: list[int], d: Dist) -> list[int]:
    """This rank's examples of a (length-sorted) global step: interleaved, so every rank gets a similar mix of lengths."""
    return step_examples[d.rank::d.world]


def all_reduce_grads(params: list[torch.Tensor], d: Dist) -> None:
    if not d.active:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def sum_float(x: float, d: Dist) -> float:
    if not d.active:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t)


def any_true(flag: bool, d: Dist) -> bool:
    if not d.active:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t)


def from_main(obj, d: Dist):
    """rank 0's value of a picklable object, on every rank."""
    if not d.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj, d: Dist) -> list:
    if not d.active:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def combine_heldout(m: dict, d: Dist) -> dict:
    """Merge per-rank held-out metrics (each over its own share of the examples) by label-token counts."""
    if not d.active:
        return m
    import math

    n = m.get("eval_label_tokens", 0)
    t = torch.tensor([m.get("eval_loss", 0.0) * n, m.get("eval_token_accuracy", 0.0) * n, n], dtype=torch.float64)
    dist.all_reduce(t)
    if t[2] == 0:
        return {}
    loss = float(t[0] / t[2])
    return {"eval_loss": round(loss, 5), "eval_ppl": round(math.exp(min(loss, 50)), 4),
            "eval_token_accuracy": round(float(t[1] / t[2]), 5), "eval_label_tokens": int(t[2])}


def finish(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
