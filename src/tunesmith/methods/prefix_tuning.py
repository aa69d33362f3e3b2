"""Prefix tuning: `virtual_tokens` trainable key/value vectors prepended in every attention layer."""
from __future__ import annotations

from peft import PrefixTuningConfig, get_peft_model

from tunesmith.methods import lora

DEFAULT_LR = 1e-2
save = lora.save


def apply(model, cfg, task: str = "causal"):
    return get_peft_model(model, PrefixTuningConfig(task_type=lora.peft_task(task), num_virtual_tokens=cfg.virtual_tokens))
