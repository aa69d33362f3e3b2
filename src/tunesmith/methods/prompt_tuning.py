"""Prompt tuning: `virtual_tokens` trainable input embeddings prepended to every sequence; the
model is untouched. Initialised from the embeddings of a text (default) so training starts from a
sensible prompt; it needs a much higher learning rate than LoRA."""
from __future__ import annotations

from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

from tunesmith.methods import lora

save = lora.save


def apply(model, cfg, task: str = "causal"):
    init = {"text": PromptTuningInit.TEXT, "vocab": PromptTuningInit.SAMPLE_VOCAB, "random": PromptTuningInit.RANDOM}
    kw = {"prompt_tuning_init_text": cfg.prompt_init_text, "tokenizer_name_or_path": model.name_or_path} if cfg.prompt_init == "text" else {}
    return get_peft_model(model, PromptTuningConfig(task_type=lora.peft_task(task), num_virtual_tokens=cfg.virtual_tokens,
                                                    prompt_tuning_init=init[cfg.prompt_init], **kw))
