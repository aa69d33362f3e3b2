"""Fine-tuning methods behind `method.name`. Each module has the same shape:

    DEFAULT_LR   tuned peak learning rate for that method
    apply(model, cfg) -> model   make exactly the method's parameters trainable
    save(model, tokenizer, out_dir)   write something plain transformers/peft can load
"""
from __future__ import annotations

from types import ModuleType

from tunesmith.methods import full, lora

METHODS: dict[str, ModuleType] = {"full": full, "lora": lora}


def get_method(name: str) -> ModuleType:
    return METHODS[name]


def parameter_report(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total, "percent": round(100.0 * trainable / max(1, total), 4)}
