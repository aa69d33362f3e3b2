"""DeepSpeed ZeRO (stages 1 and 2) under tunesmith's own loop (`train.distributed=deepspeed`).

The loop stays ours: batching, the loss (normalised by the whole global step's label tokens), the
schedule and the decision to step. DeepSpeed's engine owns what ZeRO changes: the backward
(gradients reduced into each rank's partition: stage 2 reduces during every backward, so every rank
runs the same number of passes, like FSDP), gradient clipping, and the optimizer step on each rank's
partition of the AdamW state. The engine averages gradients over ranks, so the loop scales the loss by
the world size (distributed.grad_scale), as for FSDP.

The user's DeepSpeed JSON (`train.deepspeed_config`) is passed through; the keys tunesmith sets from
`train.*` (batch sizes, accumulation, clipping, optimizer, scheduler, precision) may not appear in it.
Checkpoints are consolidated like the other backends: per-parameter AdamW moments are gathered from the
partitions (deepspeed.utils.safe_get_full_optimizer_state) into the single-process torch format, so a
ZeRO run resumes on any process count, with or without DeepSpeed.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from tunesmith.errors import TunesmithError

OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
              "optimizer", "scheduler", "fp16", "bf16", "zero_allow_untested_optimizer")


def engine_config(train_cfg, world: int) -> dict:
    """The DeepSpeed config: the user's file (if any) with tunesmith's batch, clipping and ZeRO stage."""
    user: dict = {}
    if train_cfg.deepspeed_config:
        path = Path(train_cfg.deepspeed_config)
        try:
            user = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise TunesmithError(f"train.deepspeed_config: cannot read {path} as JSON ({e})") from None
        owned = [k for k in OWNED_KEYS if k in user]
        if owned:
            raise TunesmithError(f"train.deepspeed_config {path}: remove {', '.join(owned)} -- tunesmith sets these from "
                                 f"train.* (micro_batch_size, grad_accum, max_grad_norm, optimizer, lr, schedule, model.dtype)")
        stage = user.get("zero_optimization", {}).get("stage")
        if stage is not None and stage != train_cfg.zero_stage:
            raise TunesmithError(f"train.deepspeed_config {path} sets zero_optimization.stage={stage}; set train.zero_stage "
                                 f"instead (1 or 2; stage 3's sharded weights: train.distributed=fsdp)")
    config = copy.deepcopy(user)
    config["zero_optimization"] = {**config.get("zero_optimization", {}), "stage": train_cfg.zero_stage}
    config.update({
        # one engine "micro-step" per optimizer step: the loop marks the last pass as the accumulation boundary
        "train_micro_batch_size_per_gpu": train_cfg.micro_batch_size * train_cfg.grad_accum,
        "gradient_accumulation_steps": 1,
        "train_batch_size": train_cfg.micro_batch_size * train_cfg.grad_accum * world,
        "gradient_clipping": train_cfg.max_grad_norm or 0.0,
        "zero_allow_untested_optimizer": True,  # our torch AdamW
        "steps_per_print": 1 << 30,
    })
    config.setdefault("zero_force_ds_cpu_optimizer", False)  # offload_optimizer with a torch optimizer
    return config


def wrap(model: torch.nn.Module, optimizer: torch.optim.Optimizer, train_cfg, world: int):
    """(engine, its optimizer): `model` keeps working as a module (its parameters stay full under stages 1-2)."""
    try:
        import deepspeed
    except ImportError:
        raise TunesmithError("train.distributed=deepspeed needs DeepSpeed: pip install deepspeed") from None
    order = [p for group in optimizer.param_groups for p in group["params"]]
    layout = optimizer.state_dict()["param_groups"]  # torch's format: parameter indices per group
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=engine_config(train_cfg, world))
    ds_optimizer.tunesmith_layout = (order, layout)
    return engine, ds_optimizer


def is_zero_optimizer(optimizer) -> bool:
    return hasattr(optimizer, "tunesmith_layout")


def backward(engine, loss: torch.Tensor, last_pass: bool) -> None:
    """One pass's backward; the last pass of a step is the boundary where stage 1 reduces its gradients."""
    engine.set_gradient_accumulation_boundary(last_pass)
    engine.backward(loss)


def step(engine) -> float:
    """Clip (DeepSpeed's gradient_clipping), update each rank's partition, share the new weights; the gradient norm."""
    engine.step()
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def full_optimizer_state(optimizer) -> dict:
    """The AdamW state in torch's single-process format, gathered from the ZeRO partitions (a collective)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    order, layout = optimizer.tunesmith_layout
    step = _step_count(optimizer)
    state = {}
    for i, p in enumerate(order):
        moments = {k: safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")}
        if all(v is not None for v in moments.values()):
            state[i] = {"step": torch.tensor(float(step)), **{k: v.detach().cpu().clone() for k, v in moments.items()}}
    groups = [{**g, "lr": cur["lr"]} for g, cur in zip(layout, optimizer.param_groups)]
    return {"state": state, "param_groups": groups}


def load_optimizer_state(optimizer, state: dict) -> None:
    """Scatter a single-process AdamW state into this rank's ZeRO partition, and refresh ZeRO's fp32 master copy
    of the weights from the parameters (the checkpoint's weights were just copied into them)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    order, layout = optimizer.tunesmith_layout
    if len(state["param_groups"]) != len(layout):
        raise TunesmithError("checkpoint optimizer state does not match this run's parameter groups")
    saved_steps = [float(s["step"]) for s in state["state"].values()]
    step = torch.tensor(max(saved_steps) if saved_steps else 0.0)
    # AdamW creates its state at the first step and ZeRO links it to the parameters then: do both now
    for flat in optimizer.single_partition_of_fp32_groups:
        inner = optimizer.optimizer.state[flat]
        if "exp_avg" not in inner:
            inner.update(exp_avg=torch.zeros_like(flat), exp_avg_sq=torch.zeros_like(flat))
        inner["step"] = step.clone()
    optimizer._hp_optimizer_states_linked = False
    optimizer._lazy_init_hp_params_optimizer_state()
    for i, p in enumerate(order):
        safe_set_full_fp32_param(p, p.detach().float())
        s = state["state"].get(i)
        for k in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(p, s[k].float() if s else torch.zeros(p.shape), k)
    for group, saved in zip(optimizer.param_groups, state["param_groups"]):
        group["lr"] = saved["lr"]


def _step_count(optimizer) -> int:
    for inner in optimizer.optimizer.state.values():
        if "step" in inner:
            return int(inner["step"])
    return 0
