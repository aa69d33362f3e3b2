"""LoRA: low-rank adapters on the linear layers; the base stays frozen. Built on peft.

Speed: peft computes `W x + s * B(A(x))`, i.e. per adapted layer two extra small GEMMs plus a
multiply and an add over the whole output in forward, and more elementwise work in backward —
about a fifth of a CPU step on SmolLM2. `MergedLoraLinear` computes the same function with one
GEMM each way on the merged weight `W + s B A`. It plugs in through peft's custom-module hook, so
the adapter's parameters, saving and loading are plain peft. It is used when dropout is 0, DoRA is off
and autocast is not on (`train.mixed_precision`); otherwise the stock peft layer runs. On a bfloat16
base, peft's float32 adapter is computed in bfloat16 (gradients returned in float32).

The merged weight is built once per weight update and kept (one extra copy of the adapted weights):
a step of several forward passes, the backward passes and token-by-token generation all reuse it.
It is rebuilt when any optimizer steps (torch's global step hook, put in by `apply`, bumps `weights_changed`; fused
AdamW updates in place without bumping the tensors' version counters), or when W, A, B or the
scaling change in any other visible way (version counter, storage, dtype). Code that writes the
weights behind autograd's back (`p.data.copy_`) must call `weights_changed()`. Under FSDP, whose
point is not holding whole weights, `keep_merged(model, False)` builds it per call instead.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch.optim.optimizer import register_optimizer_step_post_hook

from tunesmith.catalog import has_class_head
from tunesmith.errors import TunesmithError
from tunesmith.methods.full import transformer_blocks

_generation = 0  # bumped on every weight update; a kept merged weight from an older generation is rebuilt
_hooked = False  # the step hook goes in when the first merged LoRA model is built, not when this module is imported


def weights_changed(*_hook_args) -> None:
    global _generation
    _generation += 1


def _watch_optimizer_steps() -> None:
    global _hooked
    if not _hooked:
        register_optimizer_step_post_hook(weights_changed)
        _hooked = True


def keep_merged(model, keep: bool) -> None:
    """Keep each merged weight between updates (default) or build it on every call (less memory)."""
    for module in model.modules():
        if isinstance(module, MergedLoraLinear):
            module.keeps_merged, module._merged = keep, None


class _MergedLoraFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, merged):
        """`merged` is `W + s B A` when the caller keeps one, else None (built here and in backward). The adapter may
        be kept in float32 on a bfloat16 base: it is then computed in the base's dtype and its gradients returned in its own."""
        a, b = lora_a.to(weight.dtype), lora_b.to(weight.dtype)
        built = merged if merged is not None else torch.addmm(weight, b, a, alpha=scaling)
        ctx.save_for_backward(x, weight, a, b, merged)
        ctx.scaling, ctx.has_bias, ctx.adapter_dtype = scaling, bias is not None, lora_a.dtype
        return F.linear(x, built, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_a, lora_b, merged = ctx.saved_tensors
        s, dtype = ctx.scaling, ctx.adapter_dtype
        g2 = grad.reshape(-1, grad.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (g2 @ (merged if merged is not None else torch.addmm(weight, lora_b, lora_a, alpha=s))).view_as(x)
        grad_a = (g2 @ lora_b).T.mm(x2).mul_(s).to(dtype) if ctx.needs_input_grad[3] else None
        grad_b = g2.T.mm(x2 @ lora_a.T).mul_(s).to(dtype) if ctx.needs_input_grad[4] else None
        grad_w = g2.T.mm(x2) if ctx.needs_input_grad[1] else None
        grad_bias = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None


class MergedLoraLinear(PeftLoraLinear):
    """peft's LoRA Linear with a one-GEMM forward/backward in the common training case."""

    keeps_merged, _merged = True, None  # _merged: (key, W + s B A)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = self.active_adapters
        if (self.disable_adapters or self.merged or args or kwargs or len(active) != 1 or active[0] in self.lora_variant
                or active[0] not in self.lora_A or not isinstance(self.lora_dropout[active[0]], torch.nn.Identity)
                or x.dtype != self.get_base_layer().weight.dtype or torch.is_autocast_enabled(x.device.type)):
            return super().forward(x, *args, **kwargs)
        name, base = active[0], self.get_base_layer()
        weight, lora_a, lora_b, scaling = base.weight, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
        return _MergedLoraFunction.apply(x, weight, base.bias, lora_a, lora_b, scaling,
                                         self._kept_merged(weight, lora_a, lora_b, scaling))

    def _kept_merged(self, weight, lora_a, lora_b, scaling) -> torch.Tensor | None:
        """The kept `W + s B A`, rebuilt (a new tensor: backward may still hold the old one) when stale."""
        if not self.keeps_merged or weight.requires_grad:  # W trains too: nothing to keep between updates
            return None
        key = (_generation, scaling, weight.dtype, weight.device,
               *((t.data_ptr(), t._version) for t in (weight, lora_a, lora_b)))
        if self._merged is None or self._merged[0] != key:
            self._merged = None  # free the stale copy before building the new one
            with torch.no_grad():
                self._merged = (key, torch.addmm(weight, lora_b.to(weight.dtype), lora_a.to(weight.dtype), alpha=scaling))
        return self._merged[1]


def apply(model, cfg, task: str = "causal", merged: bool = True):
    """`merged=False` keeps peft's own layers (needed on quantized bases, whose layers subclass Linear)."""
    target_modules, layers = adapted_modules(model, cfg)
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=target_modules,
                        layers_to_transform=layers, use_rslora=cfg.rslora, use_dora=cfg.dora, task_type=peft_task(task))
    if merged:
        _watch_optimizer_steps()
        config._register_custom_module({torch.nn.Linear: MergedLoraLinear})
    return get_peft_model(model, config)


def param_groups(model, ratio: float) -> list[dict]:
    """LoRA+: the trainable weights in two optimizer groups, the B matrices' rate `ratio` x the rest's. The loop
    sets each group's rate to its `lr_scale` x the scheduled rate."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if "lora_B" not in n], "lr_scale": 1.0},
            {"params": [p for n, p in named if "lora_B" in n], "lr_scale": ratio}]


def adapted_modules(model, cfg) -> tuple:
    """LoRA's target_modules and layers_to_transform: every linear layer of every block (`all-linear`) unless
    `method.freeze_layers` leaves the first N blocks without adapters."""
    target = cfg.target_modules or "all-linear"
    if not cfg.freeze_layers:
        return target, None
    blocks = transformer_blocks(model)
    if cfg.freeze_layers >= len(blocks):
        raise TunesmithError(f"method.freeze_layers={cfg.freeze_layers} leaves no block for LoRA: this model has {len(blocks)} "
                             f"blocks; use 0 .. {len(blocks) - 1}")
    if target != "all-linear":
        return target, list(range(cfg.freeze_layers, len(blocks)))
    names = {id(m): name for name, m in model.named_modules()}
    # peft takes no layer list with "all-linear", so name the linear layers of the kept blocks
    return [f"{names[id(b)]}.{sub}" for b in blocks[cfg.freeze_layers:]
            for sub, m in b.named_modules() if isinstance(m, torch.nn.Linear)], None


def _embeddings_adapted(model) -> bool:
    """Whether the adapter saves the embedding layers: only when they are adapted. peft's default ("auto") also
    looks the base up for a resized vocabulary (tunesmith never resizes it), and warns "Could not find a config file"
    when the base is another run's adapter folder."""
    targets = getattr(model.peft_config[model.active_adapter], "target_modules", None) or ()  # prompt tuning: none
    return any(name.split(".")[-1] in ("embed_tokens", "lm_head") for name in ([targets] if isinstance(targets, str) else targets))


def peft_task(task: str) -> str:
    return "SEQ_CLS" if has_class_head(task) else "CAUSAL_LM"  # SEQ_CLS: peft trains and saves the head in full


def save(model, tokenizer, out_dir, cfg=None, task: str = "causal", state_dict: dict | None = None):
    # adapter_config.json names the base model folder, so plain PeftModel.from_pretrained works
    model.save_pretrained(out_dir, save_embedding_layers=_embeddings_adapted(model),
                          **({"state_dict": state_dict} if state_dict is not None else {}))
    tokenizer.save_pretrained(out_dir)
    if has_class_head(task):  # the base needs its head's label names back
        labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        (Path(out_dir) / "labels.json").write_text(json.dumps(labels))
