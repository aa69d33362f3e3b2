"""The precision a run trains in: the weights' dtype (`model.dtype`) and, over float32 weights, bfloat16 matmuls
(`train.mixed_precision`). Both have `auto` values that depend on the machine and the method (`pick_dtype`,
`pick_autocast`), so checkpoints record what a run trained in and a resume on another machine or backend says when
it changes and how to keep the old way.

bfloat16 matmuls over float32 weights come two ways. Full fine-tuning and BitFit train through bfloat16 copies of
the weights (`WeightCopies`): the copies are refreshed from the float32 weights once per optimizer step, swapped in
for the step's forward and backward passes, and each pass's bfloat16 gradients are summed into float32 ones; the
optimizer, evaluation and saving see only the float32 weights (as mixed precision with master weights on GPUs).
Autocast instead casts every weight again in every pass, which on a 2-core CPU cost half of what its bfloat16
matmuls saved (docs/performance.md). The other methods (adapters, whose layers keep their own merged weights) run
under autocast.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from tunesmith.catalog import METHODS
from tunesmith.models import cpu_has_amx


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype                 # of the weights
    autocast: torch.dtype | None       # of the matmuls in training passes, when not the weights'
    weight_copies: bool = False        # through bfloat16 copies of the weights (full, BitFit), not torch.autocast

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def matmuls(self) -> torch.dtype | None:
        """The training matmuls' dtype where it is not the weights' and not mixed: bfloat16 through the copies."""
        return self.autocast if self.weight_copies else None

    def describe(self) -> str:
        """For the log's `method:` line."""
        how = "bfloat16 copies of the weights in training passes" if self.weight_copies else "autocast"
        return f"{self.dtype_name} weights" + (f", bfloat16 matmuls ({how})" if self.autocast else "")

    def context(self, device: torch.device):
        """Where training forward passes (and what they are compared with) run under autocast."""
        on = self.autocast is not None and not self.weight_copies
        return torch.autocast(device.type, dtype=self.autocast or torch.bfloat16, enabled=on)

    def settings(self) -> dict:
        """As config values, the form a checkpoint records."""
        return {"model.dtype": self.dtype_name, "train.mixed_precision": "bf16" if self.autocast else "no"}


def pick_dtype(name: str, device: torch.device, method: str | None = None, task: str = "causal",
               distributed: str = "ddp") -> torch.dtype:
    """`model.dtype` for a run of `method`. `auto`: float32 for full fine-tuning and BitFit (an update of 2e-4 is below
    bfloat16's resolution for most weights, so bfloat16 weights would round it away: 20 steps of the King James
    recipe reached held-out 1.286 against float32's 1.223; `pick_autocast` gives them bfloat16 matmuls instead).
    Other methods: bfloat16 on GPUs that support it; on a CPU, bfloat16 for causal LoRA when the CPU has AMX (the
    base is frozen, peft keeps the adapters float32: 1.31x tokens/s over a 12-minute run at the same quality,
    docs/performance.md), else float32 -- not classifiers (the trained head keeps the base's dtype), other methods
    (not measured) or sharded runs (FSDP / DeepSpeed would shard a mix of dtypes); without AMX bfloat16 matmuls run
    at ~0.55x float32."""
    if name != "auto":
        return getattr(torch, name)
    spec = METHODS.get(method)
    if spec and spec.updates_base:
        return torch.float32
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if spec and spec.bf16_on_amx and task == "causal" and distributed == "ddp" and cpu_has_amx():
        return torch.bfloat16
    return torch.float32


def pick_autocast(setting: str, weights: torch.dtype, device: torch.device, method: str | None = None,
                  task: str = "causal", distributed: str = "ddp") -> torch.dtype | None:
    """`train.mixed_precision`: the dtype training passes run their matmuls in over float32 weights, or None
    (module docstring: how). `auto`: bfloat16 for full fine-tuning and BitFit of causal LMs under DDP on a device
    with fast bfloat16 (full fine-tuning on an AMX CPU: 1.1-1.3x float32's tokens/s, docs/performance.md)."""
    if weights != torch.float32 or setting == "no":
        return None
    if setting == "bf16":
        return torch.bfloat16
    fast = torch.cuda.is_bf16_supported() if device.type == "cuda" else device.type == "cpu" and cpu_has_amx()
    spec = METHODS.get(method)
    if spec and spec.updates_base and task == "causal" and distributed == "ddp" and fast:
        return torch.bfloat16
    return None


def choose(cfg, device: torch.device, task: str) -> Precision:
    dtype = pick_dtype(cfg.model.dtype, device, cfg.method.name, task, cfg.train.distributed)
    low = pick_autocast(cfg.train.mixed_precision, dtype, device, cfg.method.name, task, cfg.train.distributed)
    return Precision(dtype, low, low is not None and METHODS[cfg.method.name].updates_base)


def pass_tokens(train_cfg, precision: Precision) -> int | None:
    """The padded tokens per forward pass: `train.batch_tokens` when set; its default (1024) was measured for float32
    activations, so where the training passes compute in bfloat16 (bfloat16 weights, or the weight copies: half the
    bytes per activation) it doubles. The same bytes per pass, and on an AMX CPU 2048 ran 1.14x, 1.06x and 0.99x
    1024's tokens/s in three LoRA pairs and 1.06x for full fine-tuning, 4096 slower than 2048 (docs/performance.md);
    float32 had measured 1024 best. The run's config.yaml records the value used."""
    bfloat16_passes = precision.dtype == torch.bfloat16 or precision.weight_copies
    if bfloat16_passes and train_cfg.batch_tokens and "batch_tokens" not in train_cfg.model_fields_set:
        return 2 * train_cfg.batch_tokens
    return train_cfg.batch_tokens


class WeightCopies:
    """bfloat16 copies of a model's floating-point weights, swapped in for a step's training passes (module
    docstring). Frozen weights are cast once; trained ones again before each step, after the optimizer changed them."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16):
        self.params = [p for p in model.parameters() if p.is_floating_point()]
        self.low = [p.data.to(dtype) for p in self.params]
        self.summed: dict[torch.nn.Parameter, torch.Tensor] = {}
        for p in self.params:
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(self._sum_in_float32)

    def _sum_in_float32(self, p: torch.nn.Parameter) -> None:
        if p in self.summed:
            self.summed[p].add_(p.grad)
        else:
            self.summed[p] = p.grad.to(torch.float32)
        p.grad = None

    @contextlib.contextmanager
    def swapped_in(self):
        """The step's passes run on the copies; afterwards the weights are float32 again with float32 gradients."""
        full = [p.data for p in self.params]  # the float32 weights as they are now
        for p, weights, low in zip(self.params, full, self.low):
            if p.requires_grad:
                low.copy_(weights)
            p.data = low
        try:
            yield
        finally:
            for p, weights in zip(self.params, full):
                p.data = weights
                if p in self.summed:
                    p.grad = self.summed.pop(p)


def resume_note(recorded: dict, now: Precision, cfg, step: int) -> str | None:
    """A note when a checkpoint was trained in another precision (`recorded`: its Precision.settings()) than `now`."""
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
