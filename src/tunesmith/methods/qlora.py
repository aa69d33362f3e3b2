"""QLoRA: the frozen base in 4-bit (NF4 by default, with double quantization) via bitsandbytes,
LoRA adapters on top in full precision. Saves memory (weights ~3x smaller here), not time: on
CPU a step is a little slower than fp32 LoRA because every matmul de-quantizes its weight.
The adapter is saved alone; loading it (generate, export) puts it on the de-quantized base.
"""
from __future__ import annotations

import torch

from tunesmith.methods import lora

KEEP_FULL_PRECISION = ["lm_head", "classifier", "score"]  # output heads: small, and a classifier head trains
save = lora.save


def quantization(cfg, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type,
                              bnb_4bit_use_double_quant=cfg.double_quant, bnb_4bit_compute_dtype=dtype,
                              llm_int8_skip_modules=KEEP_FULL_PRECISION)


def apply(model, cfg, task: str = "causal"):
    from peft import prepare_model_for_kbit_training

    keep_trainable_layout(model)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return lora.apply(model, cfg, task, merged=False)


def keep_trainable_layout(model) -> None:
    """bitsandbytes 0.50 repacks 4-bit weights for a faster CPU kernel the first time a layer runs in
    eval mode without grad (as our before-training evaluation does), and layers repacked that way give
    wrong gradients afterwards: measured on SmolLM2, the gradient norm fell from 3.10 to 0.49 and
    training barely moved. Turning that kernel off keeps the weights in the layout training needs."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
