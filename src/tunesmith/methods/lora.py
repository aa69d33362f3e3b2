"""LoRA: low-rank adapters on the linear layers; the base stays frozen. Built on peft."""
from __future__ import annotations

from peft import LoraConfig, get_peft_model

# Short CPU budgets favour a high rate for rank-16 all-linear adapters (see docs/methods.md).
DEFAULT_LR = 1e-3


def apply(model, cfg):
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                        target_modules=cfg.target_modules or "all-linear", use_rslora=cfg.rslora,
                        use_dora=cfg.dora, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def save(model, tokenizer, out_dir):
    # adapter_config.json names the base model folder, so plain PeftModel.from_pretrained works
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
