"""BitFit: train the bias terms only (plus a new classification head). Llama-family models
(SmolLM2) have no biases: that is an error naming the alternatives, never a run that trains nothing."""
from __future__ import annotations

from tunesmith.catalog import has_class_head
from tunesmith.errors import TunesmithError
from tunesmith.methods.load import save_trainable



def apply(model, cfg, task: str = "causal"):
    model.requires_grad_(False)
    biases = [p for n, p in model.named_parameters() if n.endswith(".bias")]
    if not biases:
        raise TunesmithError(f"method.name=bitfit trains bias terms, and {type(model).__name__} has none; use ia3 "
                             f"(similarly few parameters) or lora")
    for p in biases:
        p.requires_grad_(True)
    if has_class_head(task):
        classifier_head(model).requires_grad_(True)
    return model


def classifier_head(model):
    for name in ("classifier", "score"):
        if hasattr(model, name):
            return getattr(model, name)
    raise TunesmithError(f"{type(model).__name__}: no classification head found (looked for .classifier and .score)")


def save(model, tokenizer, out_dir, cfg, task: str = "causal", state_dict: dict | None = None):
    save_trainable(model, tokenizer, out_dir, cfg, task, state_dict)
