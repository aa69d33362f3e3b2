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

from tunesmith.catalog import METHODS
from tunesmith.errors import TunesmithError
from tunesmith.methods.load import MARKER, PROMPT_FILE, load_model, output_method
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
    if getattr(model.generation_config, "eos_token_id", None) is None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)  # with its chat template and EOS
        if (final / PROMPT_FILE).exists():  # how the run prompts: generate/chat/serve read it from the export too
            shutil.copy2(final / PROMPT_FILE, tmp / PROMPT_FILE)
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
        (tmp / "README.md").write_text(model_card(run.path, summary))
        mark_export(tmp)

    publish_dir(out, write)
    return out


def model_card(run_dir: Path, s: dict) -> str:
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
              "## Use", "```python", "from peft import AutoPeftModelForCausalLM",
              "model = AutoPeftModelForCausalLM.from_pretrained('<this folder>')", "```"]
    return "\n".join(lines) + "\n"
