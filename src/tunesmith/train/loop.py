"""One training run, top to bottom: machine -> model -> data -> method -> loop -> evaluation -> save.

Plain PyTorch, no Trainer: we own batching (length-grouped, right-padded, no attention mask),
the loss head (vocabulary projection only where labels exist) and the thread policy.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tunesmith.config import Config, dump_yaml
from tunesmith.data import prepare
from tunesmith.data.batching import collate, effective_length, epoch_plan, split_passes
from tunesmith.evaluate.generate import Sampling, generate
from tunesmith.evaluate.heldout import heldout_metrics
from tunesmith.evaluate.side_by_side import build_rows, format_table, mean_score
from tunesmith.methods import get_method, parameter_report
from tunesmith.models import load_model, load_tokenizer, pick_device, pick_dtype, resolve_model_dir
from tunesmith.train import checkpoint
from tunesmith.train.loss import sum_loss
from tunesmith.train.rundir import choose_run_dir, create_run_dir, publish_dir, write_json_atomic, write_text_atomic
from tunesmith.train.machine import configure_threads, keep_heap_memory


@dataclass
class RunResult:
    run_dir: Path
    summary: dict


class RunLog:
    """Prints to the terminal and appends to runs/<name>/train.log (kept in memory until the run dir exists)."""

    def __init__(self):
        self.fh, self.pending = None, []

    def attach(self, path: Path) -> None:
        self.fh = open(path, "a", encoding="utf-8")
        self.fh.writelines(line + "\n" for line in self.pending)
        self.fh.flush()

    def __call__(self, msg: str) -> None:
        tqdm.write(msg)
        if self.fh is None:
            self.pending.append(msg)
            return
        self.fh.write(msg + "\n")
        self.fh.flush()


def lr_at(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 1.0 - progress) if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: Config) -> RunResult:
    t_start = time.perf_counter()
    # -- 1. machine --------------------------------------------------------------------------
    threads = configure_threads(cfg.train.threads)
    keep_heap_memory()
    device = pick_device()
    dtype = pick_dtype(cfg.model.dtype, device)
    seed_everything(cfg.train.seed)
    run_dir = choose_run_dir(cfg.output.dir, cfg.output.name, cfg.recipe, cfg.output.overwrite)
    log = RunLog()
    log(f"tunesmith: run {run_dir} | device {device.type}, {threads} threads, {str(dtype).replace('torch.', '')}")

    # -- 2. model and tokenizer --------------------------------------------------------------
    model_dir = resolve_model_dir(cfg.model.name)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype, device)
    model.config.use_cache = False

    # -- 3. data -----------------------------------------------------------------------------
    data = prepare(cfg.data, tokenizer, getattr(model.config, "max_position_embeddings", None))
    st = data.stats
    log(f"data: {st['format']} format, {st['records']} records -> train {st['train']['kept']} / val {st['val']['kept']} "
        f"(dropped {st['train']['dropped_overlong'] + st['val']['dropped_overlong']} over {st['max_length']} tokens, "
        f"truncated {st['train']['truncated']}); train tokens {st['train']['tokens']}, "
        f"of which trained {st['train']['label_tokens']} ({100 * st['train']['label_share']:.0f}%)")

    # -- 4. method ---------------------------------------------------------------------------
    method = get_method(cfg.method.name)
    model = method.apply(model, cfg.method)
    params = parameter_report(model)
    log(f"method: {cfg.method.name} | trainable {params['trainable']:,} / {params['total']:,} parameters ({params['percent']:.2f}%)")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if cfg.train.gradient_checkpointing:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # inputs are good: now the run directory may be created (or an old one replaced with --overwrite)
    create_run_dir(run_dir, cfg.output.overwrite)
    write_text_atomic(run_dir / "config.yaml", dump_yaml(cfg))
    log.attach(run_dir / "train.log")

    # -- 5. before training: held-out metrics and base outputs for the side-by-side table -------
    pad_id = tokenizer.pad_token_id
    val_tokens = data.val.tokens[: cfg.eval.max_examples]
    n_val = len(data.val.rendered)
    sample_idx = sorted({i * n_val // cfg.eval.samples for i in range(cfg.eval.samples)}) if n_val else []  # spread out
    samples = [data.val.rendered[i] for i in sample_idx]
    sampling = Sampling(max_new_tokens=cfg.eval.max_new_tokens)
    before = heldout_metrics(model, val_tokens, pad_id)
    metrics_path = run_dir / "metrics.jsonl"
    if before:
        _append_jsonl(metrics_path, {"step": 0, **before})
        log(f"held-out before training: loss {before['eval_loss']:.4f}, token accuracy {before['eval_token_accuracy']:.3f}")
    base_outputs = generate(model, tokenizer, [r.prompt for r in samples], sampling) if samples else []

    # -- 6. plan: steps, optimizer, schedule ---------------------------------------------------
    micro, accum = cfg.train.micro_batch_size, cfg.train.grad_accum
    lengths = [effective_length(t) for t in data.train.tokens]
    steps_per_epoch = max(1, math.ceil(len(lengths) / (micro * accum)))
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    warmup = int(cfg.train.warmup) if cfg.train.warmup >= 1 else int(round(cfg.train.warmup * total_steps))
    peak_lr = cfg.train.lr or method.DEFAULT_LR
    optimizer = _adamw(trainable, peak_lr, cfg.train.weight_decay, device)
    log(f"plan: {total_steps} steps x {micro * accum} examples ({total_steps / steps_per_epoch:.2f} epochs), "
        f"peak lr {peak_lr:g}, {cfg.train.schedule} schedule, {warmup} warm-up steps")

    def optimizer_steps():
        """(epoch, forward passes) for every optimizer step, epoch after epoch."""
        epoch = 0
        while True:
            for step_examples in epoch_plan(lengths, micro * accum, cfg.train.seed, epoch):
                passes = split_passes(step_examples, lengths, micro, cfg.train.batch_tokens)
                yield epoch, [collate([data.train.tokens[i] for i in p], pad_id, device) for p in passes]
            epoch += 1

    # -- 7. the loop ---------------------------------------------------------------------------
    stream = optimizer_steps()
    evals = []
    tokens_seen, train_seconds, examples_seen = 0, 0.0, 0
    model.train()
    t_loop = time.perf_counter()
    bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0 if _tty() else 30.0)
    for step in range(total_steps):
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = peak_lr * lr_at(step, total_steps, warmup, cfg.train.schedule)
        epoch, batches = next(stream)
        label_tokens = sum(b.label_tokens for b in batches)  # normalise by the whole step's labels
        step_loss = 0.0
        for batch in batches:
            loss = sum_loss(model, batch.input_ids, batch.labels) / label_tokens
            loss.backward()
            step_loss += float(loss.detach())
        if cfg.train.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_seconds += time.perf_counter() - t0
        tokens_seen += sum(b.real_tokens for b in batches)
        examples_seen += sum(b.input_ids.shape[0] for b in batches)
        tok_s = tokens_seen / train_seconds
        record = {"step": step + 1, "epoch": round(examples_seen / len(lengths), 4), "loss": round(step_loss, 5),
                  "lr": optimizer.param_groups[0]["lr"], "tokens": tokens_seen, "tok_s": round(tok_s, 1),
                  "elapsed": round(time.perf_counter() - t_start, 2)}
        bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tok_s:.0f}", epoch=epoch, refresh=False)
        bar.update(1)
        last = step + 1 == total_steps
        if cfg.eval.every_steps and (step + 1) % cfg.eval.every_steps == 0 and not last:
            record.update(heldout_metrics(model, val_tokens, pad_id))
            evals.append(record)
            log(f"step {step + 1}: held-out loss {record.get('eval_loss', float('nan')):.4f}")
        if (step + 1) % cfg.train.log_every_steps == 0 or last or "eval_loss" in record:
            _append_jsonl(metrics_path, record)
        if cfg.train.save_every_steps and (step + 1) % cfg.train.save_every_steps == 0 and not last:
            checkpoint.save(run_dir, step + 1, model, optimizer, record)
    bar.close()
    loop_seconds = time.perf_counter() - t_loop

    # -- 8. after training: metrics, side-by-side, save ---------------------------------------
    after = heldout_metrics(model, val_tokens, pad_id)
    if after:
        _append_jsonl(metrics_path, {"step": total_steps, **after})
    tuned_outputs = generate(model, tokenizer, [r.prompt for r in samples], sampling) if samples else []
    publish_dir(run_dir / "final", lambda d: method.save(model, tokenizer, d))
    rows = build_rows([_user_text(data.val.examples[i]) for i in sample_idx],
                      [r.reference for r in samples], {"base": base_outputs, "tuned": tuned_outputs})
    summary = {
        "run_dir": str(run_dir), "method": cfg.method.name, "model": cfg.model.name, "params": params,
        "data": data.stats, "steps": total_steps, "tokens": tokens_seen, "train_seconds": round(train_seconds, 1),
        "loop_seconds": round(loop_seconds, 2), "tok_s": round(tokens_seen / max(train_seconds, 1e-9), 1), "threads": threads,
        "before": before, "after": after, "evals": evals, "side_by_side": rows,
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    write_json_atomic(run_dir / "eval.json", summary)
    if rows:
        log(format_table(rows, ["base", "tuned"]))
    if before and after:
        log(f"held-out loss on responses: {before['eval_loss']:.4f} -> {after['eval_loss']:.4f} "
            f"(perplexity {before['eval_ppl']:.2f} -> {after['eval_ppl']:.2f}); "
            f"token accuracy {before['eval_token_accuracy']:.3f} -> {after['eval_token_accuracy']:.3f}")
    if rows:
        log(f"side-by-side mean ROUGE-L: base {mean_score(rows, 'base'):.1f} -> tuned {mean_score(rows, 'tuned'):.1f}")
    log(f"trained {total_steps} steps on {tokens_seen:,} tokens in {train_seconds:.0f} s ({summary['tok_s']:.0f} tok/s); "
        f"total {summary['wall_seconds']:.0f} s")
    log(f"saved: {run_dir / 'final'}  (try: tunesmith generate --run {run_dir} \"...\")")
    return RunResult(run_dir, summary)


def _user_text(example) -> str:
    users = [m["content"] for m in example.messages if m["role"] in ("user", "text")]
    return users[-1] if users else ""


def _adamw(params, lr, weight_decay, device):
    try:  # the fused kernel is fastest on CPU and GPU alike; older builds lack it for some dtypes
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def _tty() -> bool:
    import sys

    return sys.stderr.isatty()


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
