"""IA3: learned per-channel scaling of keys, values and the feed-forward input (~0.02 % of the
parameters). peft's default learning rates make it look useless; it needs a rate ~10x LoRA's."""
from __future__ import annotations

from peft import IA3Config, get_peft_model

from tunesmith.methods import lora

save = lora.save


def apply(model, cfg, task: str = "causal"):
    kw = {}
    if cfg.target_modules and cfg.target_modules != "all-linear":
        kw = {"target_modules": cfg.target_modules, "feedforward_modules": []}
    return get_peft_model(model, IA3Config(task_type=lora.peft_task(task), **kw))
