"""LoRA on an 8-bit base (bitsandbytes LLM.int8). Halves weight memory versus fp32... and is slow
on CPU (int8 matmuls with outlier handling); prefer `qlora` for memory, `lora` for speed."""
from __future__ import annotations

import torch

from tunesmith.methods import lora

KEEP_FULL_PRECISION = ["lm_head", "classifier", "score"]  # output heads: small, and a classifier head trains
save = lora.save


def quantization(cfg, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=KEEP_FULL_PRECISION)


def apply(model, cfg, task: str = "causal"):
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return lora.apply(model, cfg, task, merged=False)
