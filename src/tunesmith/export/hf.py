"""Merge a run into a plain Hugging Face model folder, and the adapter-only export.

The adapter is merged into the full-precision base (a QLoRA adapter too: loading an adapter always
puts it on the de-quantized base), so no quality is lost to merging into 4-bit weights. Methods
that change the model's structure (prompt/prefix tuning, bottleneck adapters) cannot be merged
into the base's architecture: that is an error naming the alternatives.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tunesmith.catalog import METHODS, has_class_head
from tunesmith.errors import TunesmithError
from tunesmith.methods.load import ADAPTER_CONFIG, MARKER, PROMPT_FILE, REWARD_FILE, load_model, output_method, reward_pooling
from tunesmith.models import load_tokenizer
from tunesmith.run import RunDir
from tunesmith.run.files import publish_dir
from tunesmith.run.layout import EXPORT_MARKER


def merged_model(final: Path, dtype: torch.dtype = torch.float32):
    """The run's model with its adapter merged in, as a plain transformers model, and its tokenizer."""
    method = output_method(final)
    if not METHODS[method].mergeable:
        raise TunesmithError(f"a {method} run cannot be merged into the base architecture (it adds "
                             f"{'virtual tokens' if 'tuning' in method else 'bottleneck layers'}); export it with "
                             f"--format adapter, or serve/generate from the run directory directly")
    model = load_model(final, dtype, torch.device("cpu")).eval()
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if (final / MARKER).exists():  # bitfit: the model already holds its trained biases; forget the marker
        model.name_or_path = str(final)
    return model, load_tokenizer(final)


def mark_export(folder: Path) -> None:
    """The marker that lets a later `export --overwrite` replace this folder (and nothing tunesmith did not write)."""
    (Path(folder) / EXPORT_MARKER).write_text("written by tunesmith export\n")


def export_hf(final: Path, out: Path, dtype: torch.dtype) -> Path:
    model, tokenizer = merged_model(final)
    if dtype == torch.float16:  # weights beyond float16's range would become inf in the file
        big = [n for n, p in model.state_dict().items() if p.is_floating_point() and p.abs().max() > torch.finfo(torch.float16).max]
        if big:
            raise TunesmithError(f"--dtype f16: {len(big)} tensors (e.g. {big[0]}) hold values beyond float16's range "
                                 f"({torch.finfo(torch.float16).max:g}); export f32 instead")
    model = model.to(dtype)
    generation = getattr(model, "generation_config", None)  # a classifier or reward model generates nothing
    if generation is not None and generation.eos_token_id is None:
        generation.eos_token_id = tokenizer.eos_token_id

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)  # with its chat template and EOS
        for name in (PROMPT_FILE, REWARD_FILE):  # how the run prompts and reads scores: read from the export too
            if (final / name).exists():
                shutil.copy2(final / name, tmp / name)
        mark_export(tmp)

    publish_dir(out, write)
    return out


def export_adapter(run_dir: Path, out: Path) -> Path:
    run = RunDir(run_dir)
    final = run.final
    summary = json.loads(run.summary.read_text()) if run.summary.exists() else {}

    links = [p for p in final.rglob("*") if p.is_symlink()]
    if links:  # a link planted in a shared run would export what it points to (a key file) as a regular file
        raise TunesmithError(f"{links[0]} is a symbolic link; an adapter export copies the run's own files only: remove it")

    def write(tmp: Path) -> None:
        for f in final.iterdir():
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
        (tmp / "README.md").write_text(model_card(run.path, summary, final))
        mark_export(tmp)

    publish_dir(out, write)
    return out


def model_card(run_dir: Path, s: dict, final: Path) -> str:
    before, after, data = s.get("before") or {}, s.get("after") or {}, s.get("data") or {}
    lines = [f"# {run_dir.name}", "", f"Fine-tuned with [tunesmith](https://example.invalid/tunesmith): "
             f"method `{s.get('method', '?')}` on base model `{s.get('model', '?')}`.", "",
             "## Data", f"{data.get('format', '?')} format, {data.get('records', '?')} records; "
             f"{(data.get('train') or {}).get('kept', '?')} training examples, {(data.get('val') or {}).get('kept', '?')} held out.", "",
             "## Results (held-out split)", "", "| metric | base | tuned |", "|---|---|---|"]
    lines += [f"| {k.removeprefix('eval_')} | {before[k]:.4g} | {after[k]:.4g} |" for k in after
              if k in before and isinstance(after[k], (int, float)) and not k.endswith(("_tokens", "_examples"))]
    lines += ["", f"Trainable parameters: {(s.get('params') or {}).get('trainable', '?'):,}" if s.get("params") else "",
              f"Training: {s.get('steps', '?')} steps, {s.get('tokens', 0):,} tokens, {s.get('train_seconds', '?')} s.", "",
              "## Use", *use_lines(s.get("task"), final)]
    return "\n".join(lines) + "\n"


def use_lines(task: str | None, final: Path) -> list[str]:
    """How plain peft / transformers load the exported folder: the class its task needs, and for a reward model read
    over its answer's tokens, where to find how (a tunesmith folder of another method loads through tunesmith)."""
    head = "SequenceClassification" if has_class_head(task or "causal") else "CausalLM"
    labels = final / "labels.json"  # a classifier adapter's labels (its base's config does not know them)
    count = 1 if task == "reward" else len(json.loads(labels.read_text())) if labels.exists() else None
    args = "'<this folder>'" + (f", num_labels={count}" if count else "")
    if (final / ADAPTER_CONFIG).exists():
        code = [f"from peft import AutoPeftModelFor{head}", f"model = AutoPeftModelFor{head}.from_pretrained({args})"]
    elif (final / "config.json").exists():
        code = [f"from transformers import AutoModelFor{head}", f"model = AutoModelFor{head}.from_pretrained({args})"]
    else:
        return ["A tunesmith folder (this method has no peft format): `tunesmith export <run> --format hf` writes a "
                "merged model plain transformers loads."]
    lines = ["```python", *code, "```"]
    if reward_pooling(final) == "mean":
        lines += ["", "A reward model whose score is the mean of the head's per-token scores over the answer's tokens "
                      "(tunesmith_reward.json), not the last token's: tunesmith's docs/methods.md, \"Reward models\", shows how."]
    return lines
