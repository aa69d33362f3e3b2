"""One run, assembled in one place: config -> model folder, tokenizer, data, task, precision, method, model.

`tunesmith train`, `tunesmith plan` and `tunesmith eval` all build what they work on here, so what `plan` estimates
and what `eval` scores is what `train` trains (a classifier's head, a run's precision, its data as tokenized for it).
Nothing here changes the config: values that depend on the machine (the weights' dtype, the tokens per pass) are
fields of the `Run`, and the run's config.yaml records them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from tunesmith.catalog import METHODS, MethodSpec
from tunesmith.config import Config, check_combinations, check_reward_paths, check_start_run
from tunesmith.data import PreparedData, prepare, resolve_task
from tunesmith.methods import get_method, parameter_report, quantization
from tunesmith.methods.load import context_length, load_model, merge_adapter
from tunesmith.methods.precision import Precision, choose, pass_tokens
from tunesmith.models import load_tokenizer, model_fingerprint, resolve_model_dir


@dataclass(frozen=True)
class Run:
    cfg: Config
    device: torch.device
    model_dir: Path                  # the base model folder (for a tuned base: its final/)
    tokenizer: object
    data: PreparedData
    task: str                        # causal, classification, dpo, reward, rl
    precision: Precision
    batch_tokens: int | None         # padded tokens per forward pass (train.batch_tokens, doubled for bfloat16 passes)
    fingerprint: dict                # of the data and the base model: what a resume checks
    method: MethodSpec
    model: object = None             # the base with the method applied (assemble(with_model=True))
    params: dict | None = None       # trainable / total parameter counts

    @property
    def effective_config(self) -> Config:
        """The config as the run trains it: `train.batch_tokens` as used (what config.yaml records)."""
        return self.cfg.model_copy(update={"train": self.cfg.train.model_copy(update={"batch_tokens": self.batch_tokens})})


def assemble(cfg: Config, device: torch.device, with_model: bool = True, keep_text: bool = False) -> Run:
    """Resolve and load everything a run of `cfg` is made of. `keep_text`: the training split keeps its examples and
    rendered text (a teacher answers its prompts); `with_model=False` stops before loading the model (eval)."""
    check_reward_paths(cfg)
    check_start_run(cfg)
    model_dir = resolve_model_dir(cfg.model.name)
    tokenizer = load_tokenizer(model_dir)
    rl = cfg.task == "rl"  # its objective reads the prompts' text, references and columns
    data = prepare(cfg.data, tokenizer, context_length(model_dir), for_inspection=keep_text or rl, prompts_only=rl)
    task = resolve_task(cfg.task, data.format)
    check_combinations(cfg, task)
    precision = choose(cfg, device, task)  # weights' dtype; bfloat16 matmuls over float32 ones
    fingerprint = {"data": data.stats.get("fingerprint") or cfg.data.model_dump_json(), "model": model_fingerprint(model_dir),
                   "legacy_model": model_fingerprint(model_dir, legacy=True)}
    run = Run(cfg, device, model_dir, tokenizer, data, task, precision, pass_tokens(cfg.train, precision), fingerprint,
              METHODS[cfg.method.name])
    if not with_model:
        return run
    model = load_method_model(run)
    return replace(run, model=model, params=parameter_report(model))


def load_method_model(run: Run):
    """The base in the run's dtype (quantized for QLoRA / LoRA-int8, with a head for a classifier's labels), with the
    method applied. A tuned base (an adapter run) is continued from, merged: a new adapter then names it as its base."""
    cfg = run.cfg
    method = get_method(cfg.method.name)
    dtype = run.precision.dtype
    model = load_model(run.model_dir, dtype, run.device, run.task, quantization(method, cfg.method, dtype),
                       run.data.stats.get("labels"))
    model.config.use_cache = False
    if hasattr(model, "merge_and_unload"):
        model = merge_adapter(model)
        model.name_or_path = str(run.model_dir)
    return method.apply(model, cfg.method, run.task)
