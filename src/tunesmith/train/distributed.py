"""Data-parallel training on torch.distributed (gloo on CPU, NCCL on GPU), launched by torchrun.

Every rank builds the same global step plan (it is a pure function of seed and epoch), takes its
share of each step's examples, and normalises its loss by the label tokens of the *whole global
step* -- computable on every rank without communication, because every rank holds the tokenized
data. After backward the gradients are summed across ranks in one flat all-reduce (what DDP does,
minus bucketing), so every rank applies the identical update and the result equals one process
with the same global batch. Rank 0 alone writes files; stopping (Ctrl-C, time budget) is decided
collectively so no rank is left waiting in a collective.

With `train.distributed=fsdp` the model is sharded with PyTorch's FSDP2 (`fully_shard` on every
decoder block, then the root): each rank holds 1/world of every weight, gradient and optimizer
state, and a block's weights are all-gathered only while it runs. Every forward is then a
collective, so every rank runs the same number of passes (a rank short of examples runs a filler
pass whose loss counts zero), scores the whole held-out split, and joins generation. Checkpoints
hold full (consolidated) tensors in the single-process format, so any run resumes on any process
count and any backend. `train.distributed=deepspeed` (DeepSpeed ZeRO stage 1/2) is in train/zero.py.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

# the collectives objectives need too live one floor down; the loop reaches them all through this module
from tunesmith.collectives import Dist, any_true, from_main, gather, shard, sum_float  # noqa: F401


def setup(device: torch.device, backend: str = "ddp", timeout_minutes: float = 30) -> Dist:
    """This process's place among torchrun's. `timeout_minutes`: how long a collective waits for a process that does
    not come (hung, or dead without its connection closing) before it fails; one that dies is noticed at once."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if device.type == "cuda":  # each process on its own GPU (torchrun's LOCAL_RANK); "cuda" then means that one
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=timeout_minutes))
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_WORLD_SIZE", world)), backend == "fsdp",
                backend == "deepspeed")


def shard_model(model: torch.nn.Module, d: Dist) -> None:
    """FSDP2 in place: each transformer block is its own shard group (gathered only while it runs), the rest
    (embeddings, head, final norm) one root group. FSDP averages gradients across ranks; the loop scales the
    loss by the world size (grad_scale) because it is already normalised by the global step's label tokens.
    (FSDP's own divide factor needs NCCL's PREMUL_SUM, which gloo lacks.)"""
    from torch.distributed.fsdp import fully_shard

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    block_types = tuple(getattr(inner, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in block_types]
    for block in blocks:
        fully_shard(block)
    fully_shard(model)


def grad_scale(d: Dist) -> float:
    """Factor on the loss before backward: FSDP and DeepSpeed average the ranks' gradients, DDP here sums them."""
    return float(d.world) if d.lockstep else 1.0


def equal_passes(step_examples: list[int], d: Dist, split) -> list[tuple[list[int], bool]]:
    """This rank's forward passes of a step as (examples, real). Under FSDP every rank must run as many passes
    as the busiest rank (DeepSpeed ZeRO too): the missing ones repeat an example of the step and are marked not
    real (loss x 0)."""
    mine = shard(step_examples, d)
    passes = [(p, True) for p in (split(mine) if mine else [])]
    if d.lockstep:
        most = max(len(split(step_examples[r::d.world])) if step_examples[r::d.world] else 0 for r in range(d.world))
        passes += [([step_examples[0]], False)] * (most - len(passes))
    return passes


def full_weights(model: torch.nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """The trainable weights as full CPU tensors (under FSDP a collective: call it on every rank). Gathered one tensor
    at a time and moved to the host at once, so a device holds one whole tensor at a time; a rank that does not
    write (`keep=False`) drops them at once (an empty dict)."""
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            full = _full(p.detach()).cpu().contiguous()
            if keep:
                out[n] = full
    return out


def set_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy full tensors into the model's (possibly sharded) parameters."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            p = params[name]
            if _is_dtensor(p):
                p.to_local().copy_(_like(value, p).to_local())
            else:
                p.copy_(value)


def full_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool = True) -> dict:
    """optimizer.state_dict() with sharded state tensors gathered to full ones on the host (a collective under FSDP
    and ZeRO), one tensor at a time; a rank that does not write (`keep=False`) keeps none of them."""
    from tunesmith.train import zero

    if zero.is_zero_optimizer(optimizer):
        return zero.full_optimizer_state(optimizer)
    state = optimizer.state_dict()
    gathered = {}
    for i, s in state["state"].items():
        one = {k: (_full(v).cpu() if torch.is_tensor(v) else v) for k, v in s.items()}
        if keep:
            gathered[i] = one
    state["state"] = gathered
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full-tensor optimizer state; states of sharded parameters are sharded the same way."""
    from tunesmith.train import zero

    if zero.is_zero_optimizer(optimizer):
        return zero.load_optimizer_state(optimizer, state)
    optimizer.load_state_dict(state)
    for p, s in optimizer.state.items():
        if _is_dtensor(p):
            for k, v in s.items():
                if torch.is_tensor(v) and not _is_dtensor(v) and v.shape == p.shape:
                    s[k] = _like(v, p)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """model.state_dict() with every sharded tensor gathered to a full CPU tensor (a collective under FSDP:
    every rank calls it), for saving the ordinary way."""
    gathered: dict[tuple, torch.Tensor] = {}  # tied weights (embeddings = head) stay one tensor, as HF expects
    out = {}
    for k, v in model.state_dict().items():
        local = v.to_local() if _is_dtensor(v) else v
        storage = (local.data_ptr(), tuple(v.shape)) if local.numel() else (k,)
        if storage not in gathered:
            gathered[storage] = _full(v).cpu() if _is_dtensor(v) else v
        out[k] = gathered[storage]
    return out


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)  # FSDP2's sharded parameters are DTensors too


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if _is_dtensor(t) else t


def _like(value: torch.Tensor, p) -> torch.Tensor:
    """`value` (a full tensor, identical on every rank) sharded like DTensor parameter `p`, without communication."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(p.dtype), p.device_mesh, p.placements, src_data_rank=None)


def all_reduce_grads(params: list[torch.Tensor], d: Dist) -> None:
    if not d.active or d.lockstep:  # FSDP and ZeRO reduce(-scatter) the gradients during backward
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


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
