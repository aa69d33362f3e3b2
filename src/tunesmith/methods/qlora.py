"""QLoRA: the frozen base in 4-bit (NF4 by default, with double quantization) via bitsandbytes,
LoRA adapters on top in full precision. Saves memory (weights ~3x smaller here), not time: on
CPU a step is a little slower than fp32 LoRA because every matmul de-quantizes its weight.
The adapter is saved alone; loading it (generate, export) puts it on the de-quantized base.
"""
from __future__ import annotations

import torch

from tunesmith.methods import lora

DEFAULT_LR = lora.DEFAULT_LR
KEEP_FULL_PRECISION = ["lm_head", "classifier", "score"]  # output heads: small, and a classifier head trains
save = lora.save


def quantization(cfg, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type,
                              bnb_4bit_use_double_quant=cfg.double_quant, bnb_4bit_compute_dtype=dtype,
                              llm_int8_skip_modules=KEEP_FULL_PRECISION)


def apply(model, cfg, task: str = "causal"):
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return lora.apply(model, cfg, task, merged=False)
