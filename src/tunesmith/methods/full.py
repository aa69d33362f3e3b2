"""Full fine-tuning: every weight trains, except (optionally) the embeddings and the first N blocks."""
from __future__ import annotations



def apply(model, cfg, task: str = "causal"):
    model.requires_grad_(True)
    if cfg.freeze_embeddings:
        # with tied embeddings this also freezes the output head (the same tensor)
        model.get_input_embeddings().requires_grad_(False)
    if cfg.freeze_layers:
        for block in transformer_blocks(model)[: cfg.freeze_layers]:
            block.requires_grad_(False)
    return model


def transformer_blocks(model):
    backbone = getattr(model, model.base_model_prefix, model)
    return list(getattr(backbone, "layers", None) or getattr(getattr(backbone, "encoder", None), "layer", []))


def save(model, tokenizer, out_dir, cfg=None, task: str = "causal", state_dict: dict | None = None):
    """`state_dict`: full tensors gathered from a sharded (FSDP) model; unset = the model's own."""
    model.save_pretrained(out_dir, **({"state_dict": state_dict} if state_dict is not None else {}))
    tokenizer.save_pretrained(out_dir)
