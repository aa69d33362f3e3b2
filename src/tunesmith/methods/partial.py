"""Saving and loading methods that train a subset of a model's own tensors or small modules of
ours (bitfit, adapters): the trainable tensors go to `trainable.safetensors`, and
`tunesmith_method.json` names the base model, the method and its settings, so loading rebuilds
the same structure on the base and copies the tensors in."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from tunesmith.errors import TunesmithError

MARKER = "tunesmith_method.json"


def save_trainable(model, tokenizer, out_dir: Path, cfg, task: str, state_dict: dict | None = None) -> None:
    weights = {n: (state_dict[n] if state_dict is not None else p).detach().cpu().contiguous()
               for n, p in model.named_parameters() if p.requires_grad}
    save_file(weights, Path(out_dir) / "trainable.safetensors")
    meta = {"method": cfg.name, "base_model_name_or_path": str(model.name_or_path), "task": task,
            "method_config": cfg.model_dump(), "num_labels": getattr(model.config, "num_labels", None),
            "id2label": getattr(model.config, "id2label", None) if task == "classification" else None}
    (Path(out_dir) / MARKER).write_text(json.dumps(meta, indent=1))
    tokenizer.save_pretrained(out_dir)


def load_trainable(out_dir: Path, load_base):
    """`load_base(path, task, meta)` returns the base model; the method is re-applied and the tensors loaded."""
    from tunesmith.config import MethodConfig
    from tunesmith.methods import get_method

    meta = json.loads((Path(out_dir) / MARKER).read_text())
    model = load_base(meta["base_model_name_or_path"], meta["task"], meta)
    model = get_method(meta["method"]).apply(model, MethodConfig(**meta["method_config"]), meta["task"])
    weights = load_file(Path(out_dir) / "trainable.safetensors")
    result = model.load_state_dict(weights, strict=False)
    if result.unexpected_keys:
        raise TunesmithError(f"{out_dir}: saved tensors do not fit the rebuilt model (e.g. {result.unexpected_keys[0]})")
    return model
