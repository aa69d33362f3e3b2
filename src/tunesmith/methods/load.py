"""Tuned outputs on their base: loading whatever a run's `final/` holds, and saving the partial methods.

Three kinds of output folder:
  * a full model (full fine-tuning): a plain Hugging Face folder, loaded as any base;
  * a peft adapter (LoRA, QLoRA, IA3, prompt/prefix tuning): `adapter_config.json` names the base folder;
    loading puts the adapter on the full-precision base (a QLoRA adapter too);
  * a partial method's tensors (BitFit, bottleneck adapters): `trainable.safetensors` plus `tunesmith_method.json`,
    which names the base model, the method and its settings, so loading rebuilds the same structure on the base
    and copies the tensors in.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from tunesmith.catalog import TASKS, has_class_head
from tunesmith.data.render import PromptFormat, prompt_format_of
from tunesmith.errors import TunesmithError
from tunesmith.models import load_base_model, pick_device, resolve_model_dir

MARKER = "tunesmith_method.json"
ADAPTER_CONFIG = "adapter_config.json"
PROMPT_FILE = "tunesmith_prompt.json"  # how the run rendered its prompts (data.render.PromptFormat)
REWARD_FILE = "tunesmith_reward.json"  # a reward model: where its score is read (reward.pooling)


def load_model(model_dir: Path, dtype: torch.dtype, device: Optional[torch.device] = None, task: str = "auto",
               quantization=None, labels: Optional[list[str]] = None):
    """Any model `model.name` resolves to (models.resolve_model_dir): a base, or a tuned output rebuilt on its base."""
    device = device or pick_device()
    if (model_dir / ADAPTER_CONFIG).exists():
        return _load_adapter_model(model_dir, dtype, device, task, labels)
    if (model_dir / MARKER).exists():
        saved = json.loads((model_dir / MARKER).read_text())["task"]
        fresh_head = _new_score_head(saved, task)  # e.g. a reward model started from a causal run: a fresh head
        model = load_trainable(model_dir, lambda base, t, meta: load_model(
            _base_dir(model_dir, base), dtype, device, t,
            labels=labels if fresh_head else list((meta.get("id2label") or {}).values()) or None), task if fresh_head else None)
        model.name_or_path = str(model_dir)  # what a new adapter or method on it names as its base (not the base below)
        return model.to(device)
    return load_base_model(model_dir, dtype, device, task, quantization, labels)


def _load_adapter_model(adapter_dir: Path, dtype, device, task: str = "auto", labels: Optional[list[str]] = None):
    """A peft adapter on its base, de-quantized (a QLoRA adapter is applied to the full-precision base). A classifier's
    or reward model's adapter comes back as the classifier it trained; a causal adapter asked for as a sequence
    classifier (`task` classification or reward: a reward model started from an SFT run) comes back merged, under a
    fresh score head for `labels` (a reward model: one scalar)."""
    from peft import PeftModel

    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    base_dir = _base_dir(adapter_dir, config["base_model_name_or_path"])
    classifier = config.get("task_type") == "SEQ_CLS"
    if classifier:
        base = load_model(base_dir, dtype, device, "classification",
                          labels=json.loads((adapter_dir / "labels.json").read_text()))
    else:
        base = load_model(base_dir, dtype, device)
    base = merge_adapter(base)  # the base may itself be a tuned adapter run (e.g. DPO after SFT)
    model = PeftModel.from_pretrained(base, adapter_dir)
    if not _new_score_head("classification" if classifier else "causal", task):
        return model
    if model.active_peft_config.is_prompt_learning:
        raise TunesmithError(f"{adapter_dir}: a {output_method(adapter_dir)} run cannot start a {task} model: its soft "
                             "prompt cannot be merged into the weights a score head reads (start from its base instead)")
    model = _under_score_head(merge_adapter(model), base_dir, dtype, device, task, labels)
    model.name_or_path = str(adapter_dir)  # what a new adapter on it names as its base (assemble.load_method_model)
    return model


def _new_score_head(saved_task: str, task: str) -> bool:
    """Whether a tuned output saved for `saved_task` is asked for as a sequence classifier it is not (its weights
    under a fresh score head)."""
    return task in TASKS and has_class_head(task) and not (saved_task in TASKS and has_class_head(saved_task))


def _under_score_head(tuned, base_dir: Path, dtype, device, task: str, labels: Optional[list[str]]):
    """`tuned` (a causal LM) as a sequence classifier for `task`: its base's classifier (a fresh head) with `tuned`'s
    backbone weights. Both architectures keep the backbone under the same `base_model` prefix."""
    model = load_model(base_dir, dtype, device, task, labels=labels)
    model.base_model.load_state_dict(tuned.base_model.state_dict())  # strict: every backbone weight is replaced
    return model


def merge_adapter(model):
    """A peft model with its adapter folded into the weights (plain and as fast as the base); models
    whose adapter cannot be folded in (prompt/prefix tuning) and plain models come back unchanged."""
    if hasattr(model, "merge_and_unload") and not model.active_peft_config.is_prompt_learning:
        return model.merge_and_unload()
    return model


def output_method(final: Path) -> str:
    """The method that wrote a run's `final/` folder."""
    if (final / ADAPTER_CONFIG).exists():
        peft_type = json.loads((final / ADAPTER_CONFIG).read_text()).get("peft_type", "LORA")
        return {"PROMPT_TUNING": "prompt-tuning", "PREFIX_TUNING": "prefix-tuning"}.get(peft_type, peft_type.lower())
    if (final / MARKER).exists():
        return json.loads((final / MARKER).read_text())["method"]
    return "full"


def base_of(model_dir: Path) -> Path | None:
    """The base model folder a tuned output was trained on; None for a plain model folder."""
    for marker in (ADAPTER_CONFIG, MARKER):
        if (model_dir / marker).exists() and not (model_dir / "config.json").exists():
            return _base_dir(model_dir, json.loads((model_dir / marker).read_text())["base_model_name_or_path"])
    return None


def _base_dir(output: Path, recorded: str) -> Path:
    """The base folder a tuned output names. A bundled base is recorded as its cache folder, which clearing
    ~/.cache/tunesmith removes: then the run's own config (final/../config.yaml) names it again (model.name), and
    resolving that rebuilds it."""
    if (Path(recorded) / MARKER).exists():  # a partial method's run (its final/ has no config.json)
        return Path(recorded)
    if Path(recorded).exists():
        return resolve_model_dir(recorded)
    config = Path(output).parent / "config.yaml"
    if config.exists():
        from tunesmith.config import read_yaml

        name = (read_yaml(config).get("model") or {}).get("name")
        if name:
            return resolve_model_dir(name)
    return resolve_model_dir(recorded)


def context_length(model_dir: Path) -> int | None:
    """The context length of `model_dir`'s architecture (a tuned output: its base model's); None if it names none."""
    from transformers import AutoConfig

    base = base_of(model_dir)
    if base is not None:
        return context_length(base)
    return getattr(AutoConfig.from_pretrained(model_dir), "max_position_embeddings", None)


def save_prompt_format(folder: Path, fmt: PromptFormat) -> None:
    (Path(folder) / PROMPT_FILE).write_text(json.dumps(fmt.to_json(), indent=1, ensure_ascii=False))


def prompt_format(model_dir: Path) -> PromptFormat:
    """How prompts to `model_dir` are rendered: as its run trained (its PROMPT_FILE; for a run saved before there was
    one, its config's template and system prompt), or the model's own chat template."""
    model_dir = Path(model_dir)
    if (model_dir / PROMPT_FILE).exists():
        return PromptFormat.from_json(json.loads((model_dir / PROMPT_FILE).read_text()))
    config = model_dir.parent / "config.yaml"
    if model_dir.name == "final" and config.exists():
        from tunesmith.config import read_yaml

        data = read_yaml(config).get("data") or {}
        return prompt_format_of(data.get("template", "chat"), data.get("system_prompt"), [])
    return PromptFormat()


def save_reward_pooling(folder: Path, pooling: str) -> None:
    (Path(folder) / REWARD_FILE).write_text(json.dumps({"pooling": pooling}) + "\n")


def reward_pooling(model_dir: Path) -> str:
    """Where a reward model's score is read (`reward.pooling`): its REWARD_FILE says; a model without one is read at
    the last token (transformers' rule, and every reward run's before the setting existed)."""
    path = Path(model_dir) / REWARD_FILE
    return json.loads(path.read_text()).get("pooling", "last") if path.exists() else "last"


def save_trainable(model, tokenizer, out_dir: Path, cfg, task: str, state_dict: dict | None = None) -> None:
    weights = {n: (state_dict[n] if state_dict is not None else p).detach().cpu().contiguous()
               for n, p in model.named_parameters() if p.requires_grad}
    save_file(weights, Path(out_dir) / "trainable.safetensors")
    meta = {"method": cfg.name, "base_model_name_or_path": str(model.name_or_path), "task": task,
            "method_config": cfg.model_dump(), "num_labels": getattr(model.config, "num_labels", None),
            "id2label": getattr(model.config, "id2label", None) if has_class_head(task) else None}
    (Path(out_dir) / MARKER).write_text(json.dumps(meta, indent=1))
    tokenizer.save_pretrained(out_dir)


def load_trainable(out_dir: Path, load_base, task: str | None = None):
    """`load_base(path, task, meta)` returns the base model; the method is re-applied and the tensors loaded. `task`:
    the task the model is rebuilt for (default: the one it trained; a classifier's task on a causal run's tensors
    leaves the score head fresh)."""
    from tunesmith.config import MethodConfig
    from tunesmith.methods import get_method

    meta = json.loads((Path(out_dir) / MARKER).read_text())
    task = task or meta["task"]
    model = load_base(meta["base_model_name_or_path"], task, meta)
    model = get_method(meta["method"]).apply(model, MethodConfig(**meta["method_config"]), task)
    weights = load_file(Path(out_dir) / "trainable.safetensors")
    result = model.load_state_dict(weights, strict=False)
    if result.unexpected_keys:
        raise TunesmithError(f"{out_dir}: saved tensors do not fit the rebuilt model (e.g. {result.unexpected_keys[0]})")
    return model
