"""Fine-tuning methods behind `method.name`, one module each (declared in tunesmith.catalog.METHODS). Each module
has the same shape:

    apply(model, cfg, task) -> model            make exactly the method's parameters trainable
    save(model, tokenizer, out_dir, cfg, task, state_dict=None)  write what `methods.load.load_model` (and, for full
                                                and the peft methods, plain transformers/peft) can load
    quantization(cfg, dtype)                    optional: how to load the base (qlora, lora-int8)

Its facts (tuned learning rate, tasks, what it exports to, ...) are its `MethodSpec` in the catalog.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from tunesmith.catalog import METHODS, MethodSpec


def get_method(name: str) -> ModuleType:
    return importlib.import_module(f"tunesmith.methods.{METHODS[name].module}")


def spec(name: str) -> MethodSpec:
    return METHODS[name]


def quantization(method: ModuleType, cfg, dtype):
    return method.quantization(cfg, dtype) if hasattr(method, "quantization") else None


def parameter_report(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total, "percent": round(100.0 * trainable / max(1, total), 4)}
