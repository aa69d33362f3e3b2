"""Collectives over torchrun's processes that the loop (train/) and the objectives (online RL) both use.

One floor below the objectives (the import layers in pyproject.toml put train/ above them), so an objective that
must combine something over the processes calls the same few functions the loop does instead of its own copy.
Plain torch.distributed: a process that is alone (no process group, or a group of one) gets its own value back
without communicating. The loop is handed its place (`Dist`, from train/distributed.py's setup); an objective asks
for it with `joined()`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_world: int = 1
    fsdp: bool = False  # weights sharded across ranks: every forward is a collective
    zero: bool = False  # DeepSpeed ZeRO (train/zero.py): its engine reduces the gradients during backward

    @property
    def lockstep(self) -> bool:
        """Every rank must run the same number of forward/backward passes per step (their collectives pair up)."""
        return self.fsdp or self.zero

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def joined() -> Dist:
    """This process's place in the initialised process group (rank and world size), or alone (`Dist()`)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return Dist()
    return Dist(dist.get_rank(), dist.get_world_size())


def shard(step_examples: list[int], d: Dist) -> list[int]:
    """This rank's examples of a (length-sorted) global step: interleaved, so every rank gets a similar mix of lengths."""
    return step_examples[d.rank::d.world]


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
    """Every process's picklable `obj`, in rank order (a collective: every rank calls it)."""
    if not d.active:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def across_processes(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each tensor joined along its last dimension over the processes of the initialised group, in rank order (a
    collective: every rank calls it, online RL at every new batch of rollouts); alone, the tensors themselves."""
    d = joined()
    if not d.active:
        return tensors
    parts = gather([t.cpu() for t in tensors], d)
    return tuple(torch.cat([p[k] for p in parts], dim=-1) for k in range(len(tensors)))
