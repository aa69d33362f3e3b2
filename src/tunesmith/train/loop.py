"""One training run, top to bottom: machine -> model -> data -> method -> loop -> evaluation -> save.

Plain PyTorch, no Trainer: we own batching (length-grouped, right-padded, no attention mask),
the loss head (vocabulary projection only where labels exist), the thread policy, and exact
resume (the batch order is a pure function of seed and epoch, so a resumed run fast-forwards the
plan without touching data, restores weights/optimizer/RNG and continues bit for bit).
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from tunesmith.config import Config, changed_settings, check_combinations, dump_yaml, read_yaml
from tunesmith.data import prepare, resolve_task
from tunesmith.data.render import IGNORE
from tunesmith.data.batching import collate, effective_length, epoch_plan, split_passes
from tunesmith.data.shapes import user_text
from tunesmith.errors import TunesmithError
from tunesmith.evaluate import forgetting
from tunesmith.evaluate.generate import Generation, Sampling, generate
from tunesmith.evaluate.classification import classification_metrics, predicted_labels
from tunesmith.evaluate.heldout import heldout_metrics
from tunesmith.evaluate.report import write_report
from tunesmith.evaluate.side_by_side import build_rows, format_table
from tunesmith.methods import get_method, lora, parameter_report, quantization
from tunesmith.models import load_model, load_tokenizer, max_positions, merge_adapter, model_fingerprint, pick_device, resolve_model_dir
from tunesmith.train import checkpoint, precision as run_precision
from tunesmith.train.interrupt import StopRequests, TrainingInterrupted
from tunesmith.train.loss import class_sum_loss, sum_loss
from tunesmith.train.distill import cached_distill_sum_loss, check_tokenizers, distill_sum_loss, teacher_answers, teacher_topk
from tunesmith.train.preference import REFERENCE_FREE, dpo_sum_loss, pair_logprobs, preference_metrics, reference_logprobs
from tunesmith.train import distributed, neftune, zero
from tunesmith.train.machine import available_cores, configure_threads, keep_heap_memory
from tunesmith.train.rundir import choose_run_dir, create_run_dir, publish_dir, write_json_atomic, write_text_atomic
from tunesmith.train.runlog import RunLog, append_jsonl, metrics_line, progress_bar, result_lines, truncate_metrics
from tunesmith.train.plan import estimate
from tunesmith.train.trackers import Trackers, check_installed
from tunesmith.train.schedule import budget_steps, lr_at, make_optimizer, plan_steps, warmup_steps


@dataclass
class RunResult:
    run_dir: Path
    summary: dict


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: Config, resume: Path | None = None, force_resume: bool = False, force: bool = False) -> RunResult:
    """Run `cfg`; with `resume` (a run directory), continue it from its newest good checkpoint.
    A run whose memory estimate exceeds what is available is refused unless `force`."""
    t_start = time.perf_counter()
    # -- 1. machine, processes and run directory ------------------------------------------------
    device = pick_device()
    ddp = distributed.setup(device, cfg.train.distributed)  # one process, or this rank of a torchrun launch
    threads = configure_threads(cfg.train.threads or (max(1, available_cores() // ddp.local_world) if ddp.active else None))
    keep_heap_memory()
    seed_everything(cfg.train.seed)
    auto = _auto_resume_dir(cfg)
    run_dir = distributed.from_main((resume or auto or choose_run_dir(
        cfg.output.dir, cfg.output.name, cfg.recipe, cfg.output.overwrite)) if ddp.main else None, ddp)
    resuming = run_dir in (resume, auto)
    log = RunLog(enabled=ddp.main)  # rank 0 alone writes logs and files
    log(f"tunesmith: {'resuming' if resuming else 'run'} {run_dir} | device {device.type}, {threads} threads"
        + (f", {ddp.world} processes ({cfg.train.distributed})" if ddp.active else ""))
    if cfg.train.distributed != "ddp" and not ddp.active:
        log(f"train.distributed={cfg.train.distributed} takes effect with several processes (--nproc N); one process trains as is")

    # -- 2. tokenizer and data ---------------------------------------------------------------
    model_dir = resolve_model_dir(cfg.model.name)
    tokenizer = load_tokenizer(model_dir)
    sequence_distill = bool(cfg.distill.teacher) and cfg.distill.mode == "sequence"
    data = prepare(cfg.data, tokenizer, max_positions(model_dir), for_inspection=sequence_distill)  # keep prompts to answer
    st = data.stats
    task = resolve_task(cfg.task, data.format)
    check_combinations(cfg, task)
    precision = run_precision.choose(cfg, device, task)  # weights' dtype; bfloat16 matmuls over float32 ones
    run_precision.set_pass_tokens(cfg, precision)  # bfloat16 activations: twice the default tokens per pass
    dtype = precision.dtype
    log(f"data: {st['format']} format, {st['records']} records -> train {st['train']['kept']} / val {st['val']['kept']} "
        f"(dropped {st['train']['dropped_overlong'] + st['val']['dropped_overlong']} over {st['max_length']} tokens, "
        f"truncated {st['train']['truncated']}); train tokens {st['train']['tokens']}, "
        f"of which trained {st['train']['label_tokens']} ({100 * st['train']['label_share']:.0f}%)"
        + (" [tokenized data from cache]" if "from_cache" in st else ""))
    if task == "classification":
        log(f"task: classification into {len(st['labels'])} labels: " + ", ".join(
            f"{name} {n}" for name, n in st["label_counts"]["train"].items()))
    fingerprint = {"data": st.get("fingerprint") or cfg.data.model_dump_json(),
                   "model": model_fingerprint(model_dir)}

    # -- 3. model and method, step count, memory check ------------------------------------------
    method = get_method(cfg.method.name)
    model = load_model(model_dir, dtype, device, task, quantization(method, cfg.method, dtype), st.get("labels"))
    model.config.use_cache = False
    if hasattr(model, "merge_and_unload"):  # starting from a tuned adapter run: continue from it, merged
        model = merge_adapter(model)
        model.name_or_path = str(model_dir)  # a new adapter then names that run as its base
    model = method.apply(model, cfg.method, task)
    params = parameter_report(model)
    log(f"method: {cfg.method.name}, {precision.describe()} | trainable {params['trainable']:,} / {params['total']:,} parameters ({params['percent']:.2f}%)")
    if cfg.train.gradient_checkpointing:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if ddp.fsdp:  # weights, gradients and optimizer state sharded across the processes
        distributed.shard_model(model, ddp)
        lora.keep_merged(model, False)  # nor whole merged LoRA weights kept between updates
    trainable = [p for p in model.parameters() if p.requires_grad]
    copies = run_precision.WeightCopies(model) if precision.weight_copies else None  # bfloat16 ones for training passes

    def training_passes():  # where a step's forward and backward passes run
        return copies.swapped_in() if copies else contextlib.nullcontext()
    joins_forwards = ddp.main or ddp.fsdp  # rank-0-only forwards (generation, ...) need every rank under FSDP
    micro, accum = cfg.train.micro_batch_size, cfg.train.grad_accum
    teacher = None
    if cfg.distill.teacher:  # knowledge distillation: the teacher's soft targets (or its answers) for this student
        teacher_dir = resolve_model_dir(cfg.distill.teacher)
        check_tokenizers(tokenizer, load_tokenizer(teacher_dir), cfg.distill.mode)
        teacher = load_model(teacher_dir, dtype, device, task, labels=st.get("labels")).eval()
        teacher = merge_adapter(teacher)
        teacher.requires_grad_(False)
        log(f"distillation from {cfg.distill.teacher} ({sum(p.numel() for p in teacher.parameters()):,} parameters), "
            f"{cfg.distill.mode} mode, alpha {cfg.distill.alpha}, T {cfg.distill.temperature}, {cfg.distill.kl} KL")
        if sequence_distill:
            _, planned = plan_steps(cfg, len(data.train.tokens), ddp.world)
            teacher_answers(teacher, tokenizer, data, cfg, planned * micro * accum * ddp.world, log)
    lengths = [effective_length(t) for t in data.train.tokens]
    global_batch = micro * accum * ddp.world
    steps_per_epoch, total_steps = plan_steps(cfg, len(lengths), ddp.world)
    memory = estimate(cfg, model, params["trainable"], st, total_steps)
    if not memory.fits:
        if not force:
            raise TunesmithError(f"this run would not fit in memory:\n{memory.describe()}\n(pass --force to try anyway)")
        log(f"warning: the memory estimate ({memory.total / 2**30:.1f} GiB) exceeds what is available; going on (--force)")
    check_installed(cfg.train.report_to)
    # inputs are good: now the run directory may be created (or an old one replaced with --overwrite)
    ckpt = checkpoint.resume_point(run_dir, fingerprint, force_resume, log) if resuming else None
    if ddp.main:
        if not resuming:
            create_run_dir(run_dir, cfg.output.overwrite)
        elif changed := changed_settings(read_yaml(run_dir / "config.yaml"), cfg.model_dump(mode="json")):
            log("resuming with changed settings (config.yaml now has the new ones): " + "; ".join(changed))
        write_text_atomic(run_dir / "config.yaml", dump_yaml(cfg))
        log.attach(run_dir / "train.log")
    trackers = Trackers(cfg.train.report_to if ddp.main else [], run_dir, cfg.model_dump(), resumed=resuming)
    metrics_path = run_dir / "metrics.jsonl"

    def record_metrics(row: dict) -> None:
        if ddp.main:
            append_jsonl(metrics_path, row)
            trackers.log(row)

    # -- 4. before training: held-out metrics and base outputs for the side-by-side table -------
    pad_id = tokenizer.pad_token_id
    val_tokens = data.val.tokens[: cfg.eval.max_examples]
    n_val = len(data.val.rendered)
    sample_idx = sorted({i * n_val // cfg.eval.samples for i in range(cfg.eval.samples)}) if n_val else []  # spread out
    samples = [data.val.rendered[i] for i in sample_idx]
    sampling = Sampling(max_new_tokens=cfg.eval.max_new_tokens, num_beams=cfg.eval.num_beams)

    reference_free = task == "dpo" and cfg.dpo.loss in REFERENCE_FREE  # simpo, orpo: no reference model
    ref_val = ref_train = None
    if task == "dpo" and not reference_free:  # the reference = the model before training: its held-out log-probs now
        ref_val = reference_logprobs(model, val_tokens, pad_id)
        # with an adapter the reference is the same model with the adapter off (computed per step); otherwise
        # the training pairs' reference log-probs are computed here, once
        if not hasattr(model, "disable_adapter"):
            with precision.context(device), training_passes():  # as the policy's log-probs are computed in training
                ref_train = reference_logprobs(model, data.train.tokens, pad_id)

    def evaluate(model) -> dict:
        if task == "dpo":
            return preference_metrics(model, val_tokens, ref_val, pad_id, cfg.dpo)
        if task == "classification":  # macro-F1 needs every prediction: each rank scores the whole split
            return classification_metrics(model, val_tokens, pad_id)
        if ddp.fsdp:  # every forward is a collective: every rank scores the whole split (same passes, same sums)
            return heldout_metrics(model, val_tokens, pad_id)
        # each rank scores its share of the split; the sums are combined (no example counted twice)
        return distributed.combine_heldout(heldout_metrics(model, distributed.shard(val_tokens, ddp), pad_id), ddp)

    def sample_outputs(model) -> list:
        if not samples or not joins_forwards:
            return []
        if task == "classification":
            return predicted_labels(model, [data.val.tokens[i] for i in sample_idx], pad_id, st["labels"])
        return generate(model, tokenizer, [r.prompt for r in samples], sampling)
    if resuming:  # measured when the run started
        baseline = json.loads((run_dir / "baseline.json").read_text())
        baseline["base_outputs"] = [Generation(**g) for g in baseline["base_outputs"]]
        base_general = forgetting.load_base(run_dir / "baseline_general.safetensors")
    else:
        with _as_base(model):  # prompt/prefix tuning start from non-neutral virtual tokens: measure the base itself
            baseline = {"before": evaluate(model), "base_outputs": sample_outputs(model)}
            # the forgetting check's reference: the base model on general text unlike the training data
            base_general = forgetting.measure_base(model, tokenizer) if task == "causal" and joins_forwards else None
        if ddp.main:
            write_json_atomic(run_dir / "baseline.json", {**baseline, "base_outputs": [asdict(g) for g in baseline["base_outputs"]]})
        if base_general and ddp.main:
            forgetting.save_base(run_dir / "baseline_general.safetensors", base_general)
        if baseline["before"]:
            record_metrics({"step": 0, **baseline["before"]})
    before = baseline["before"]
    teacher_metrics = evaluate(teacher) if teacher is not None else None
    if teacher_metrics:
        log("teacher on the held-out split: " + metrics_line(teacher_metrics))
    topk = None
    if teacher is not None and cfg.distill.top_k:  # one teacher pass now (rank 0 writes), then the teacher is freed
        build = lambda: teacher_topk(teacher, data.train.tokens, cfg.distill.top_k, run_dir / "teacher_topk", pad_id,
                                     device, cfg.train.batch_tokens or 4096, log)
        if ddp.main:
            build()
        distributed.from_main(None, ddp)  # the others wait for the files, then map them
        topk, teacher = build(), None
    if before:
        log("held-out before training: " + metrics_line(before))

    # -- 5. optimizer, schedule, resume point --------------------------------------------------
    budget = cfg.train.max_minutes * 60 if cfg.train.max_minutes else None
    if budget:  # a first plan from this machine's measured matmul speed; re-planned from real steps below
        step_cap = total_steps
        guess = estimate(cfg, model, params["trainable"], st, total_steps, time_it=0.5,
                         matmuls=precision.matmuls).seconds / total_steps
        total_steps = max(1, min(step_cap, int(budget / guess)))
        log(f"time budget {cfg.train.max_minutes:g} min: first plan {total_steps} steps (~{guess:.1f} s/step estimated), "
            f"re-planned from the measured pace as training runs")
    warmup = warmup_steps(cfg.train.warmup, total_steps)
    peak_lr = cfg.train.lr or method.DEFAULT_LR
    groups = lora.param_groups(model, cfg.method.loraplus_lr_ratio) if cfg.method.loraplus_lr_ratio else trainable
    optimizer = make_optimizer(cfg.train.optimizer, groups, peak_lr, cfg.train.weight_decay, log)
    engine = None  # DeepSpeed ZeRO: its engine runs backward and the optimizer step (train/zero.py)
    if ddp.zero:
        engine, optimizer = zero.wrap(model, optimizer, cfg.train, ddp.world)
        log(f"DeepSpeed ZeRO stage {cfg.train.zero_stage}: optimizer state"
            + (" and gradients" if cfg.train.zero_stage == 2 else "") + f" partitioned over {ddp.world} processes")
    log(f"plan: {total_steps} steps x {micro * accum} examples ({total_steps / steps_per_epoch:.2f} epochs), "
        f"peak lr {peak_lr:g}" + (f" (LoRA B matrices {peak_lr * cfg.method.loraplus_lr_ratio:g})" if cfg.method.loraplus_lr_ratio else "")
        + f", {cfg.train.schedule} schedule, {warmup} warm-up steps")
    progress = {"step": 0, "examples": 0, "tokens": 0, "train_seconds": 0.0, "evals": [], "skipped_steps": [], "best": None,
                "first_step_seconds": 0.0, "planned_steps": total_steps, "global_batch": global_batch,
                "precision": precision.settings()}
    if ckpt:
        if note := run_precision.resume_note(ckpt.progress, precision, cfg, ckpt.step):
            log(note)  # auto resolved differently on another machine or backend
        checkpoint.restore(ckpt, model, optimizer)
        progress.update({k: ckpt.progress.get(k, v) for k, v in progress.items() if k != "precision"})
        total_steps = progress["planned_steps"] if budget else total_steps
        if progress["global_batch"] != global_batch:
            raise TunesmithError(f"{ckpt.path} was trained with a global batch of {progress['global_batch']} examples; this launch "
                                 f"has {global_batch} (micro_batch_size x grad_accum x processes); set train.grad_accum to match")
        truncate_metrics(metrics_path, ckpt.step)
        log(f"resumed from {ckpt.path.name}: step {ckpt.step} of {total_steps}")
        if ckpt.step >= total_steps:
            raise TunesmithError(f"{ckpt.path} is at step {ckpt.step}, the plan has {total_steps}; raise train.max_steps to train further")

    # what a step's loss is averaged over: trained tokens, or whole examples (a class label, a preference pair)
    example_labels = [1 if t.label is not None or t.rejected is not None else int((t.labels[1:] != IGNORE).sum())
                      for t in data.train.tokens]

    per_pass = 1 if task == "dpo" else micro  # a DPO pair alone in its pass: its answers share the prompt's compute

    def split(examples: list[int]) -> list[list[int]]:
        return split_passes(examples, lengths, per_pass, cfg.train.batch_tokens)

    def step_plan():
        """(epoch, this rank's forward passes, the global step's examples) for every optimizer step."""
        epoch = 0
        while True:
            for step_examples in epoch_plan(lengths, global_batch, cfg.train.seed, epoch):
                yield epoch, distributed.equal_passes(step_examples, ddp, split), step_examples
            epoch += 1

    # -- 6. the loop ---------------------------------------------------------------------------
    plan = step_plan()
    for _ in range(progress["step"]):  # fast-forward to the checkpoint: the same order, no tensors built
        next(plan)
    remove_noise = neftune.add_noise(model, cfg.train.neftune_noise_alpha) if cfg.train.neftune_noise_alpha else None
    model.train()
    local_examples = 0  # examples this rank trained on (the sharding test counts them)
    t_loop = time.perf_counter()
    bar = progress_bar(total_steps, "train", "step", disable=not ddp.main, initial=progress["step"])
    with StopRequests(log) as stop:
        step = progress["step"] - 1
        while step + 1 < total_steps:
            step += 1
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = group.get("lr_scale", 1.0) * peak_lr * lr_at(step, total_steps, warmup, cfg.train.schedule)
            epoch, passes, step_examples = next(plan)
            batches = [collate([data.train.tokens[i] for i in p], pad_id, device) for p, _ in passes]
            label_tokens = sum(example_labels[i] for i in step_examples)  # normalise by the whole global step's labels
            step_loss = 0.0
            with training_passes():  # on bfloat16 copies of the weights, when the run uses them
                for (p, real), batch in zip(passes, batches):
                    with precision.context(device):
                        if topk is not None:
                            loss = cached_distill_sum_loss(model, batch, topk.rows(p), cfg.distill) / label_tokens
                        elif teacher is not None and not sequence_distill:
                            loss = distill_sum_loss(model, teacher, batch, cfg.distill) / label_tokens
                        elif task == "dpo":
                            ref = None if reference_free else _reference(model, batch, ref_train, p)
                            loss = dpo_sum_loss(model, batch, ref, cfg.dpo) / label_tokens
                        elif task == "classification":
                            loss = class_sum_loss(model, batch, label_smoothing=cfg.train.label_smoothing) / label_tokens
                        else:
                            loss = sum_loss(model, batch.input_ids, batch.labels,
                                            label_smoothing=cfg.train.label_smoothing) / label_tokens
                    # FSDP, ZeRO: x world undoes their average over ranks; a filler pass joins the collectives, counts nothing
                    scaled = loss * (distributed.grad_scale(ddp) if real else 0.0)
                    if engine is not None:
                        zero.backward(engine, scaled, last_pass=batch is batches[-1])
                    else:
                        scaled.backward()
                    step_loss += float(loss.detach()) if real else 0.0
            distributed.all_reduce_grads(trainable, ddp)
            step_loss = distributed.sum_float(step_loss, ddp)
            if engine is not None:  # ZeRO clips and steps each rank's partition; a non-finite loss stops before it
                grad_norm = zero.step(engine) if math.isfinite(step_loss) else float("nan")
            else:
                grad_norm = _grad_norm(trainable, cfg.train.max_grad_norm)
            finite = math.isfinite(step_loss) and math.isfinite(grad_norm)
            if finite and engine is None:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if not finite:
                _non_finite(step + 1, step_loss, grad_norm, cfg.train.on_nonfinite, run_dir, log)
                progress["skipped_steps"].append(step + 1)
            progress["train_seconds"] += time.perf_counter() - t0
            progress["tokens"] += sum(lengths[i] for i in step_examples)
            progress["examples"] += len(step_examples)
            local_examples += sum(len(p) for p, real in passes if real)
            progress["step"] = step + 1
            if step == 0:
                progress["first_step_seconds"] = progress["train_seconds"]
            if budget:  # rank 0's clock decides for everyone
                total_steps = distributed.from_main(budget_steps(budget, step_cap, step + 1, progress["train_seconds"],
                                                                 progress["first_step_seconds"]), ddp)
                progress["planned_steps"] = bar.total = total_steps
                warmup = warmup_steps(cfg.train.warmup, total_steps)
            tok_s = progress["tokens"] / progress["train_seconds"]
            record = {"step": step + 1, "epoch": round(progress["examples"] / len(lengths), 4), "loss": round(step_loss, 5),
                      "lr": optimizer.param_groups[0]["lr"], "grad_norm": round(grad_norm, 4), "tokens": progress["tokens"],
                      "tok_s": round(tok_s, 1), "elapsed": round(time.perf_counter() - t_start, 2)}
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tok_s:.0f}", epoch=epoch, refresh=False)
            bar.update(1)
            last = step + 1 == total_steps
            evaluating = cfg.eval.every_steps and (step + 1) % cfg.eval.every_steps == 0
            evaluating = evaluating or (cfg.eval.each_epoch and (step + 1) % steps_per_epoch == 0)
            if evaluating and not last:
                record.update(evaluate(model))
                progress["evals"].append(record)
                log(f"step {step + 1}: " + metrics_line(record))
                if _improves(cfg.train.select_best, record, progress["best"]):
                    progress["best"] = {"step": step + 1, "value": record[cfg.train.select_best]}
                    weights = distributed.full_weights(model)  # a collective under FSDP
                    if ddp.main:
                        checkpoint.save_best(run_dir, weights, record)
            if (step + 1) % cfg.train.log_every_steps == 0 or last or "eval_loss" in record:
                record_metrics(record)
            due = cfg.train.save_every_steps and (step + 1) % cfg.train.save_every_steps == 0
            due = due or (cfg.train.save_each_epoch and (step + 1) % steps_per_epoch == 0)
            stopping = distributed.any_true(stop.requested, ddp)
            if (due or stopping) and not last:
                weights, optimizer_state = distributed.full_weights(model), distributed.full_optimizer_state(optimizer)
                if ddp.main:
                    checkpoint.save_or_warn(run_dir, weights, optimizer_state, {**progress, "eval_loss": record.get("eval_loss"),
                                            "fingerprint": fingerprint}, cfg.train.keep_checkpoints, log)
            if stopping and not last:
                bar.close()
                trackers.close()
                distributed.finish(ddp)
                command = f"tunesmith train --resume {run_dir}"
                raise TrainingInterrupted(f"stopped by {stop.signal_name or 'a signal'} after step {step + 1} of {total_steps}; "
                                          f"checkpoint written", command)
    bar.close()
    loop_seconds = time.perf_counter() - t_loop
    if remove_noise:
        remove_noise()

    # -- 7. after training: metrics, side-by-side, save ---------------------------------------
    after = evaluate(model)
    best = progress["best"]
    examples_per_rank = distributed.gather(local_examples, ddp)
    if best and not _improves(cfg.train.select_best, after, best):
        checkpoint.load_best(run_dir, model)
        log(f"train.select_best: finishing with step {best['step']}'s weights "
            f"({cfg.train.select_best} {best['value']:.4f}; the last step had {after.get(cfg.train.select_best, float('nan')):.4f})")
        after = evaluate(model)
    elif best:  # the last step's weights beat every earlier evaluation: they are the best, and the ones kept
        best = {"step": total_steps, "value": after[cfg.train.select_best]}
    if after:
        record_metrics({"step": total_steps, **after})
    trackers.close()
    tuned_outputs = sample_outputs(model)
    drift = forgetting.compare_to_base(model, base_general) if base_general and joins_forwards else None
    full_state = distributed.full_state_dict(model) if ddp.fsdp else None  # gathered (every rank) for rank 0 to save
    if not ddp.main:  # the other ranks are done: rank 0 saves and reports
        distributed.finish(ddp)
        return RunResult(run_dir, {"after": after, "rank": ddp.rank})
    publish_dir(run_dir / "final", lambda d: method.save(model, tokenizer, d, cfg.method, task, full_state))
    rows = build_rows([user_text(data.val.examples[i]) for i in sample_idx],
                      [r.reference for r in samples], {"base": baseline["base_outputs"], "tuned": tuned_outputs})
    tokens_seen, train_seconds = progress["tokens"], progress["train_seconds"]
    summary = {
        "run_dir": str(run_dir), "task": task, "method": cfg.method.name, "dtype": precision.dtype_name,
        "mixed_precision": "bf16" if precision.autocast else None, "best": best, "model": cfg.model.name, "params": params,
        "data": data.stats, "steps": total_steps, "tokens": tokens_seen, "train_seconds": round(train_seconds, 1),
        "loop_seconds": round(loop_seconds, 2), "tok_s": round(tokens_seen / max(train_seconds, 1e-9), 1), "threads": threads,
        "before": before, "after": after, "evals": progress["evals"], "skipped_steps": progress["skipped_steps"],
        "teacher": teacher_metrics, "resumed_from": ckpt.step if ckpt else None, "epochs": round(progress["examples"] / len(lengths), 3),
        "examples": progress["examples"], "budget_minutes": cfg.train.max_minutes, "processes": ddp.world,
        "global_batch": global_batch, "examples_per_rank": examples_per_rank, "side_by_side": rows, "forgetting": drift,
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    write_json_atomic(run_dir / "eval.json", summary)
    write_report(run_dir)
    if rows:
        log(format_table(rows, ["base", "tuned"]))
    for line in result_lines(task, before, after, rows, drift):
        log(line)
    log(f"trained {total_steps} steps ({summary['epochs']:.2f} epochs) on {tokens_seen:,} tokens in {train_seconds:.0f} s "
        f"({summary['tok_s']:.0f} tok/s)" + (f" within the {cfg.train.max_minutes:g}-minute budget" if budget else "")
        + f"; total {summary['wall_seconds']:.0f} s")
    log(f"report: {run_dir / 'report.html'}")
    distributed.finish(ddp)
    log(f"saved: {run_dir / 'final'}  (try: tunesmith generate --run {run_dir} \"...\"; tunesmith eval {run_dir})")
    return RunResult(run_dir, summary)


def _reference(model, batch, ref_train, pass_examples) -> torch.Tensor:
    """Reference log-probs (chosen, rejected) of this pass's pairs: precomputed, or the model with its adapter off."""
    if ref_train is not None:
        return ref_train[pass_examples]
    with torch.no_grad(), model.disable_adapter():
        return torch.stack(pair_logprobs(model, batch), dim=1)


def _improves(metric: str | None, record: dict, best: dict | None) -> bool:
    if not metric or metric not in record:
        return False
    if best is None:
        return True
    lower_is_better = metric in ("eval_loss", "eval_ppl")
    return record[metric] < best["value"] if lower_is_better else record[metric] > best["value"]


def _as_base(model):
    """The model without its adapter (peft methods), for measuring the base in place."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


def _auto_resume_dir(cfg: Config) -> Path | None:
    """With output.resume=auto: the named run directory, when it has a checkpoint and no final model yet."""
    if cfg.output.resume != "auto" or not cfg.output.name or cfg.output.overwrite:
        return None
    path = Path(cfg.output.dir) / cfg.output.name
    return path if checkpoint.all_checkpoints(path) and not (path / "final").exists() else None


def _grad_norm(params: list[torch.Tensor], max_norm: float | None) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    if max_norm:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor


def _non_finite(step: int, loss: float, grad_norm: float, policy: str, run_dir: Path, log) -> None:
    what = f"step {step}: loss {loss}, gradient norm {grad_norm}"
    if policy == "skip":
        log(f"{what} is not finite; update skipped (train.on_nonfinite=skip)")
        return
    ckpts = checkpoint.all_checkpoints(run_dir)
    kept = f"the last checkpoint is {ckpts[-1]}" if ckpts else "no checkpoint was written yet"
    raise TunesmithError(f"{what} is not finite; training stopped ({kept}). Try a lower train.lr, "
                         f"train.max_grad_norm, or train.on_nonfinite=skip to skip such steps")

