"""Fine-tuning methods behind `method.name`. Each module has the same shape:

    DEFAULT_LR                                  tuned peak learning rate for that method
    apply(model, cfg, task) -> model            make exactly the method's parameters trainable
    save(model, tokenizer, out_dir, cfg, task, state_dict=None)  write what `models.load_model` (and, for full and
                                                the peft methods, plain transformers/peft) can load
    quantization(cfg, dtype)                    optional: how to load the base (qlora, lora-int8)
"""
from __future__ import annotations

from types import ModuleType

from tunesmith.methods import adapters, bitfit, full, ia3, lora, lora_int8, prefix_tuning, prompt_tuning, qlora

METHODS: dict[str, ModuleType] = {"full": full, "lora": lora, "qlora": qlora, "lora-int8": lora_int8, "ia3": ia3,
                                  "prompt-tuning": prompt_tuning, "prefix-tuning": prefix_tuning,
                                  "adapters": adapters, "bitfit": bitfit}


def get_method(name: str) -> ModuleType:
    return METHODS[name]


def quantization(method: ModuleType, cfg, dtype):
    return method.quantization(cfg, dtype) if hasattr(method, "quantization") else None


def parameter_report(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total, "percent": round(100.0 * trainable / max(1, total), 4)}
