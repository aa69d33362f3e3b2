"""One training run, top to bottom: machine -> assembled run -> objective -> baseline -> the loop -> evaluation -> save.

Plain PyTorch, no Trainer: we own batching (length-grouped, right-padded, no attention mask), the loss head
(vocabulary projection only where labels exist), the thread policy, and exact resume (the batch order is a pure
function of seed and epoch, so a resumed run fast-forwards the plan without touching data, restores
weights/optimizer/RNG and continues bit for bit). What a step optimises and how the model is measured is the
objective's (tunesmith/objectives); this file keeps what every objective shares: forward passes and accumulation,
sharding over processes, the cadence of evaluations and checkpoints, the time budget and stop requests.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from tunesmith.assemble import assemble
from tunesmith.config import Config, changed_settings, dump_yaml, read_yaml, unused_settings
from tunesmith.data.batching import collate, effective_length, epoch_plan, split_passes
from tunesmith.data.render import prompt_format_of
from tunesmith.errors import TunesmithError
from tunesmith.evaluate import forgetting
from tunesmith.evaluate.closing import TRAINED, Closing, close, improves, sample_indices, write_final
from tunesmith.evaluate.side_by_side import format_table, rouge_applies
from tunesmith.methods import lora
from tunesmith.methods.precision import WeightCopies, resume_note
from tunesmith.models import neftune, pick_device
from tunesmith.models.generate import Generation
from tunesmith.objectives import Context, objective_for
from tunesmith.run import RunDir
from tunesmith.run.files import append_jsonl, publish_dir, write_json_atomic, write_text_atomic
from tunesmith.run.layout import choose_run_dir, create_run_dir
from tunesmith.run.lock import RunLock
from tunesmith.run.log import RunLog, progress_bar
from tunesmith.run.trackers import Trackers, check_installed
from tunesmith.train import checkpoint, distributed, zero
from tunesmith.train.console import data_lines, result_lines
from tunesmith.train.interrupt import StopRequests, TrainingInterrupted
from tunesmith.train.machine import available_cores, configure_threads, keep_heap_memory
from tunesmith.train.plan import estimate
from tunesmith.train.progress import Progress
from tunesmith.train.schedule import budget_steps, lr_at, make_optimizer, plan_steps, warmup_steps


@dataclass
class RunResult:
    run_dir: Path
    summary: dict


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: Config, resume: Path | None = None, force_resume: bool = False, force: bool = False,
          overwrite: bool = False) -> RunResult:
    """Run `cfg`; with `resume` (a run directory), continue it from its newest good checkpoint. `overwrite` replaces
    an existing run directory of the same name (one tunesmith made). A run whose memory estimate exceeds what is
    available is refused unless `force`."""
    with contextlib.ExitStack() as held:  # the run directory's lock, released however the run ends
        return _train(cfg, resume, force_resume, force, overwrite, held)


def _train(cfg: Config, resume: Path | None, force_resume: bool, force: bool, overwrite: bool,
           held: contextlib.ExitStack) -> RunResult:
    t_start = time.perf_counter()
    # -- 1. machine, processes and run directory ------------------------------------------------
    device = pick_device()
    ddp = distributed.setup(device, cfg.train.distributed, cfg.train.process_timeout_minutes)  # or this rank of several
    threads = configure_threads(cfg.train.threads or (max(1, available_cores() // ddp.local_world) if ddp.active else None))
    keep_heap_memory()
    seed_everything(cfg.train.seed)
    resumable = restart = None
    if ddp.main:  # rank 0 alone picks, locks and writes the run directory
        resumable, restart = checkpoint.auto_resume_dir(cfg.output, overwrite)
        chosen = resume or resumable
        if chosen is not None:  # one writer per run: a live run is never resumed a second time
            if Path(chosen).is_dir():
                held.enter_context(RunLock(chosen).acquire("training (resumed)"))
        else:
            chosen = choose_run_dir(cfg.output.dir, cfg.output.name, cfg.recipe, overwrite or restart).path
    run_dir = RunDir(distributed.from_main(chosen if ddp.main else None, ddp))
    resuming = distributed.from_main((resume or resumable) is not None if ddp.main else None, ddp)
    log = RunLog(enabled=ddp.main)  # rank 0 alone writes logs and files
    if restart:
        log(f"output.resume=auto: {run_dir} stopped before its first checkpoint; starting it again")
    log(f"tunesmith: {'resuming' if resuming else 'run'} {run_dir} | device {device.type}, {threads} threads"
        + (f", {ddp.world} processes ({cfg.train.distributed})" if ddp.active else ""))
    if cfg.train.distributed != "ddp" and not ddp.active:
        log(f"train.distributed={cfg.train.distributed} takes effect with several processes (--nproc N); one process trains as is")

    # -- 2. the run: model folder, tokenizer, data, task, precision, method, model ----------------
    sequence_distill = bool(cfg.distill.teacher) and cfg.distill.mode == "sequence"
    run = assemble(cfg, device, keep_text=sequence_distill)  # keep prompts for the teacher to answer
    cfg = run.effective_config  # with train.batch_tokens as used
    for line in data_lines(run):
        log(line)
    model, params, precision = run.model, run.params, run.precision
    log(f"method: {cfg.method.name}, {precision.describe()} | trainable {params['trainable']:,} / {params['total']:,} "
        f"parameters ({params['percent']:.2f}%)")
    for key in unused_settings(cfg):
        log(f"note: {key} is not read by method.name={cfg.method.name}; it has no effect on this run")
    if cfg.train.gradient_checkpointing:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if ddp.fsdp:  # weights, gradients and optimizer state sharded across the processes
        distributed.shard_model(model, ddp)
        lora.keep_merged(model, False)  # nor whole merged LoRA weights kept between updates
    trainable = [p for p in model.parameters() if p.requires_grad]
    copies = WeightCopies(model) if precision.weight_copies else None  # bfloat16 ones for training passes

    def training_passes():  # where a step's forward and backward passes run
        return copies.swapped_in() if copies else contextlib.nullcontext()

    @contextlib.contextmanager
    def as_in_training():  # the precision and weights training passes compute with (a reference pass matches them)
        with precision.context(device), training_passes():
            yield

    objective = objective_for(run.task, cfg, run.data, run.tokenizer, precision.dtype)

    def measure(m) -> dict:
        if objective.measure_shards and not ddp.fsdp:  # each rank scores its share; the sums are combined
            return distributed.combine_heldout(objective.measure(m, distributed.shard(objective.val, ddp)), ddp)
        return objective.measure(m, objective.val)  # every rank scores the whole split (FSDP: every forward is a collective)

    ctx = Context(device, log, ddp.main, lambda: distributed.from_main(None, ddp), as_in_training, measure,
                  run_dir.teacher_topk, cfg.train.batch_tokens)
    micro, accum = cfg.train.micro_batch_size, cfg.train.grad_accum
    global_batch = micro * accum * ddp.world
    objective.load(ctx, plan_steps(cfg, len(objective.train), ddp.world)[1] * global_batch)  # a teacher (its answers)
    lengths = [effective_length(t) for t in objective.train]
    repeats = objective.steps_per_batch  # RL: optimizer steps on one batch of rollouts
    steps_per_epoch, total_steps = plan_steps(cfg, len(lengths), ddp.world, repeats)
    memory = estimate(cfg, model, params["trainable"], run.data.stats, total_steps)
    if not memory.fits:
        if not force:
            raise TunesmithError(f"this run would not fit in memory:\n{memory.describe()}\n(pass --force to try anyway)")
        log(f"warning: the memory estimate ({memory.total / 2**30:.1f} GiB) exceeds what is available; going on (--force)")
    check_installed(cfg.train.report_to)
    # inputs are good: now the run directory may be created (or an old one replaced with --overwrite)
    ckpt = checkpoint.resume_point(run_dir, run.fingerprint, force_resume, log) if resuming else None
    replaced = None
    if ddp.main:
        if not resuming:
            replaced = create_run_dir(run_dir, overwrite or bool(restart))
            held.enter_context(RunLock(run_dir.path).acquire("training"))
            if replaced:
                log(f"replacing {run_dir} (--overwrite): the run it replaces is kept in {replaced} until this one is trained")
        elif changed := changed_settings(read_yaml(run_dir.config), cfg.model_dump(mode="json")):
            log("resuming with changed settings (config.yaml now has the new ones): " + "; ".join(changed))
        write_text_atomic(run_dir.config, dump_yaml(cfg))
        log.attach(run_dir.log)
    trackers = Trackers(cfg.train.report_to if ddp.main else [], run_dir.path, cfg.model_dump(), resumed=resuming)

    def record_metrics(row: dict) -> None:
        if ddp.main:
            append_jsonl(run_dir.metrics, row)
            trackers.log(row)

    # -- 3. before training: the objective's own preparation, the base's held-out metrics and outputs --------
    joins_forwards = ddp.main or ddp.fsdp  # rank-0-only forwards (generation, ...) need every rank under FSDP
    objective.prepare(model, ctx)  # reference log-probs (DPO); the teacher's metrics and cache (distillation)
    sample_idx = sample_indices(len(run.data.val.rendered), cfg.eval.samples)  # spread over the split

    def sample_outputs(m) -> list:
        return objective.samples(m, sample_idx) if sample_idx and joins_forwards else []

    if resuming:  # measured when the run started
        baseline = json.loads(run_dir.baseline.read_text())
        baseline["base_outputs"] = [Generation(**g) for g in baseline["base_outputs"]]
        base_general = forgetting.load_base(run_dir.baseline_general)
    else:
        with _as_base(model):  # prompt/prefix tuning start from non-neutral virtual tokens: measure the base itself
            baseline = {"before": measure(model), "base_outputs": sample_outputs(model)}
            # the forgetting check's reference: the base model on general text unlike the training data
            base_general = forgetting.measure_base(model, run.tokenizer) if objective.checks_forgetting and joins_forwards else None
        if ddp.main:
            try:
                write_json_atomic(run_dir.baseline, {**baseline, "base_outputs": [asdict(g) for g in baseline["base_outputs"]]})
                if base_general:
                    forgetting.save_base(run_dir.baseline_general, base_general)
            except Exception as e:  # before the first step: nothing trained is lost
                raise TunesmithError(f"could not write the base model's measurements into {run_dir}: "
                                     f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if baseline["before"]:
            record_metrics({"step": 0, **baseline["before"]})
    before = baseline["before"]
    if before:
        log("held-out before training: " + objective.describe(before))

    # -- 4. optimizer, schedule, resume point --------------------------------------------------
    budget = cfg.train.max_minutes * 60 if cfg.train.max_minutes else None
    step_cap = total_steps
    if budget:  # a first plan from this machine's measured matmul speed; re-planned from real steps below
        guess = estimate(cfg, model, params["trainable"], run.data.stats, total_steps, time_it=0.5,
                         matmuls=precision.matmuls).seconds / total_steps
        total_steps = max(1, min(step_cap, int(budget / guess)))
        log(f"time budget {cfg.train.max_minutes:g} min: first plan {total_steps} steps (~{guess:.1f} s/step estimated), "
            f"re-planned from the measured pace as training runs")
    warmup = warmup_steps(cfg.train.warmup, total_steps)
    peak_lr = cfg.train.lr or run.method.default_lr
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
    progress = Progress(planned_steps=total_steps, global_batch=global_batch, precision=precision.settings(),
                        fingerprint=run.fingerprint)
    if ckpt:
        if note := resume_note(ckpt.progress.precision, precision, cfg, ckpt.step):
            log(note)  # auto resolved differently on another machine or backend
        if (saved := checkpoint.restore(ckpt, model, optimizer)) is not None:
            objective.restore_state(saved)  # RL between two updates on one batch of rollouts: that batch
        progress = ckpt.progress.continued(progress)
        total_steps = progress.planned_steps if budget else total_steps
        if progress.global_batch != global_batch:
            raise TunesmithError(f"{ckpt.path} was trained with a global batch of {progress.global_batch} examples; this launch "
                                 f"has {global_batch} (micro_batch_size x grad_accum x processes); set train.grad_accum to match")
        checkpoint.truncate_metrics(run_dir, ckpt.step)
        stale = checkpoint.best_step(run_dir) if ddp.main and run_dir.best.exists() else None
        if stale is not None and stale != (progress.best or {}).get("step"):
            shutil.rmtree(run_dir.best)  # written after this checkpoint, by steps that run again: not this run's best
            log(f"best/ held step {stale}'s weights, from after {ckpt.path.name}: discarded")
        log(f"resumed from {ckpt.path.name}: step {ckpt.step} of {total_steps}")
        if ckpt.step >= total_steps:
            raise TunesmithError(f"{ckpt.path} is at step {ckpt.step}, the plan has {total_steps}; raise train.max_steps to train further")

    weights = [objective.weight(t) for t in objective.train]  # what a step's loss is averaged over
    per_pass = objective.examples_per_pass or micro

    def split(examples: list[int]) -> list[list[int]]:
        return split_passes(examples, lengths, per_pass, cfg.train.batch_tokens)

    def step_plan():
        """(epoch, this rank's forward passes, the global step's examples) for every optimizer step."""
        epoch = 0
        while True:
            for step_examples in epoch_plan(lengths, global_batch, cfg.train.seed, epoch):
                for _ in range(repeats):
                    yield epoch, distributed.equal_passes(step_examples, ddp, split), step_examples
            epoch += 1

    # -- 5. the loop ---------------------------------------------------------------------------
    plan = step_plan()
    for _ in range(progress.step):  # fast-forward to the checkpoint: the same order, no tensors built
        next(plan)
    remove_noise = neftune.add_noise(model, cfg.train.neftune_noise_alpha) if cfg.train.neftune_noise_alpha else None
    model.train()
    local_examples = 0  # examples this rank trained on (the sharding test counts them)
    t_loop = time.perf_counter()
    bar = progress_bar(total_steps, "train", "step", disable=not ddp.main, initial=progress.step)
    skipped_in_a_row = 0
    with StopRequests(announce=ddp.main) as stop:
        step = progress.step - 1
        while step + 1 < total_steps:
            step += 1
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = group.get("lr_scale", 1.0) * peak_lr * lr_at(step, total_steps, warmup, cfg.train.schedule)
            epoch, passes, step_examples = next(plan)
            batches = [collate([objective.train[i] for i in p], objective.pad_id, device) for p, _ in passes]
            label_tokens = sum(weights[i] for i in step_examples)  # normalise by the whole global step's labels
            step_loss = 0.0
            with training_passes():  # on bfloat16 copies of the weights, when the run uses them
                objective.begin_step(model, [i for p, _ in passes for i in p], step)  # RL: the rollouts
                for (p, real), batch in zip(passes, batches):
                    with precision.context(device):
                        loss = objective.loss(model, batch, p) / label_tokens
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
            skipped_in_a_row = 0 if finite else skipped_in_a_row + 1
            if not finite:
                _non_finite(step + 1, step_loss, grad_norm, cfg.train.on_nonfinite, run_dir, log, skipped_in_a_row)
                progress.skipped_steps.append(step + 1)
            progress.train_seconds += time.perf_counter() - t0
            progress.tokens += sum(lengths[i] for i in step_examples)
            progress.examples += len(step_examples)
            local_examples += sum(len(p) for p, real in passes if real)
            progress.step = step + 1
            if step == 0:
                progress.first_step_seconds = progress.train_seconds
            if budget:  # rank 0's clock decides for everyone
                total_steps = distributed.from_main(budget_steps(budget, step_cap, step + 1, progress.train_seconds,
                                                                 progress.first_step_seconds), ddp)
                progress.planned_steps = bar.total = total_steps
                warmup = warmup_steps(cfg.train.warmup, total_steps)
            tok_s = progress.tokens / progress.train_seconds
            record = {"step": step + 1, "total_steps": total_steps, "epoch": round(progress.examples / repeats / len(lengths), 4),
                      "loss": round(step_loss, 5), "lr": optimizer.param_groups[0]["lr"], "grad_norm": round(grad_norm, 4),
                      "tokens": progress.tokens, "tok_s": round(tok_s, 1), "elapsed": round(time.perf_counter() - t_start, 2),
                      **objective.step_metrics()}
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tok_s:.0f}", epoch=epoch, refresh=False)
            bar.update(1)
            last = step + 1 == total_steps
            evaluating = cfg.eval.every_steps and (step + 1) % cfg.eval.every_steps == 0
            evaluating = evaluating or (cfg.eval.each_epoch and (step + 1) % steps_per_epoch == 0)
            if evaluating and not last:
                record.update(measure(model))
                progress.evals.append(record)
                log(f"step {step + 1}: " + objective.describe(record))
                if improves(cfg.train.select_best, record, progress.best):
                    best_weights = distributed.full_weights(model, keep=ddp.main)  # a collective under FSDP
                    saved = checkpoint.save_best(run_dir, best_weights, record, log) if ddp.main else None
                    if distributed.from_main(saved, ddp):  # a best/ that could not be written is not claimed
                        progress.best = {"step": step + 1, "value": record[cfg.train.select_best]}
            if (step + 1) % cfg.train.log_every_steps == 0 or last or "eval_loss" in record:
                record_metrics(record)
            due = cfg.train.save_every_steps and (step + 1) % cfg.train.save_every_steps == 0
            due = due or (cfg.train.save_each_epoch and (step + 1) % steps_per_epoch == 0)
            stopping = distributed.any_true(stop.requested, ddp)
            written = None
            if (due or stopping) and not last:
                state = distributed.full_weights(model, ddp.main), distributed.full_optimizer_state(optimizer, ddp.main)
                kept = objective.resume_state()  # every rank: RL gathers the processes' rollouts
                if ddp.main:
                    progress.eval_loss = record.get("eval_loss")
                    written = checkpoint.save_or_warn(run_dir, *state, progress, cfg.train.keep_checkpoints, log, kept)
            if stopping and not last:
                bar.close()
                trackers.close()
                distributed.finish(ddp)
                log(f"{stop.signal_name or 'a signal'}: stopped after step {step + 1} of {total_steps}")
                older = checkpoint.all_checkpoints(run_dir)
                saved = ("checkpoint written" if written else "the checkpoint could not be written (see above); "
                         + (f"the last one is {older[-1].name}" if older else "there is no checkpoint to resume from"))
                raise TrainingInterrupted(f"stopped by {stop.signal_name or 'a signal'} after step {step + 1} of {total_steps}; "
                                          f"{saved}", f"tunesmith train --resume {run_dir}")
        bar.close()
        loop_seconds = time.perf_counter() - t_loop
        if remove_noise:
            remove_noise()
        # -- 6. the trained weights on disk first; then the closing evaluation ---------------------
        prompts = prompt_format_of(cfg.data.template, cfg.data.system_prompt, run.data.val.examples)

        def save_final() -> None:  # a collective under FSDP (every rank gathers), rank 0 writes
            full_state = distributed.full_state_dict(model) if ddp.fsdp else None
            if ddp.main:
                _publish_final(run_dir, lambda folder: write_final(folder, model, run.tokenizer, cfg, run.task, objective,
                                                                   prompts, full_state))

        examples_per_rank = distributed.gather(local_examples, ddp)
        tokens_seen, train_seconds = progress.tokens, progress.train_seconds
        summary = {
            "run_dir": str(run_dir), "state": TRAINED, "task": run.task, "method": cfg.method.name,
            "dtype": precision.dtype_name, "mixed_precision": "bf16" if precision.autocast else None, "best": progress.best,
            "model": cfg.model.name, "params": params, "data": run.data.stats, "steps": total_steps, "tokens": tokens_seen,
            "train_seconds": round(train_seconds, 1), "loop_seconds": round(loop_seconds, 2),
            "tok_s": round(tokens_seen / max(train_seconds, 1e-9), 1), "threads": threads, "before": before, "after": None,
            "evals": progress.evals, "skipped_steps": progress.skipped_steps,
            "teacher": getattr(objective, "teacher_metrics", None), "resumed_from": ckpt.step if ckpt else None,
            "epochs": round(progress.examples / repeats / len(lengths), 3), "examples": progress.examples,
            "budget_minutes": cfg.train.max_minutes, "processes": ddp.world, "global_batch": global_batch,
            "examples_per_rank": examples_per_rank, "side_by_side": [], "forgetting": None,
        }
        if ddp.main:  # "trained": what `tunesmith eval` completes if the run stops from here on
            write_json_atomic(run_dir.summary, summary)
        save_final()
        if ddp.main:
            if replaced is not None:
                shutil.rmtree(replaced, ignore_errors=True)
                log(f"the run it replaced ({replaced}) is deleted")
        complete_with = f"tunesmith eval {run_dir}"
        stopped = TrainingInterrupted(f"stopped during the closing evaluation; the trained model is saved in {run_dir.final} "
                                      f"(the run is trained, its evaluation incomplete)", complete_with, "complete it with")
        if distributed.any_true(stop.requested, ddp):  # asked to stop during the last step: the weights are saved
            trackers.close()
            distributed.finish(ddp)
            raise stopped
        stop.stop_at_once(stopped)  # from here a signal stops the evaluation at once: nothing it would lose
        closing = Closing(run_dir, objective, model, total_steps, baseline, base_general, measure, save_final,
                          lambda: checkpoint.load_best(run_dir, model), record_metrics, cfg.train.select_best, progress.best,
                          ddp.main, joins_forwards, log, started=t_start)
        try:
            summary = close(closing, summary)
        except TrainingInterrupted:
            trackers.close()
            raise
        except Exception as e:
            if not ddp.main:
                raise
            raise TunesmithError(f"the closing evaluation failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                 f"the trained model is saved in {run_dir.final}: complete the evaluation with "
                                 f"{complete_with}") from e
        stop.stop_at_once(None)
    trackers.close()
    if not ddp.main:  # the other ranks are done: rank 0 reports
        distributed.finish(ddp)
        return RunResult(run_dir.path, {"after": closing.result["after"], "rank": ddp.rank})
    rows, after, drift = summary["side_by_side"], summary["after"], summary["forgetting"]
    if rows:
        log(format_table(rows, ["base", "tuned"], generated=rouge_applies(rows, objective.generates)))
    for line in result_lines(objective, before, after, rows, drift):
        log(line)
    log(f"trained {total_steps} steps ({summary['epochs']:.2f} epochs) on {tokens_seen:,} tokens in {train_seconds:.0f} s "
        f"({summary['tok_s']:.0f} tok/s)" + (f" within the {cfg.train.max_minutes:g}-minute budget" if budget else "")
        + f"; total {summary['wall_seconds']:.0f} s")
    log(f"report: {run_dir.report}")
    distributed.finish(ddp)
    log(f"saved: {run_dir.final}  (try: tunesmith generate --run {run_dir} \"...\"; tunesmith eval {run_dir})")
    return RunResult(run_dir.path, summary)


def _publish_final(run_dir: RunDir, write) -> None:
    """final/, or an error that says what is left when it cannot be written (a full disk, a file too large, ...)."""
    try:
        publish_dir(run_dir.final, write)
    except Exception as e:
        older = checkpoint.all_checkpoints(run_dir)
        left = (f"the last checkpoint {older[-1]} is intact: free space and resume with tunesmith train --resume {run_dir}"
                if older else "no checkpoint was written (set train.save_every_steps to have one to resume from)")
        reason = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).splitlines() or [type(e).__name__])[0]
        raise TunesmithError(f"could not save the trained model to {run_dir.final}: {reason}; {left}") from None


def _as_base(model):
    """The model without its adapter (peft methods), for measuring the base in place."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


def _grad_norm(params: list[torch.Tensor], max_norm: float | None) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    if max_norm:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor


MAX_SKIPPED_IN_A_ROW = 10  # train.on_nonfinite=skip: this many non-finite steps in a row stop the run


def _non_finite(step: int, loss: float, grad_norm: float, policy: str, run_dir: RunDir, log, in_a_row: int = 1) -> None:
    what = f"step {step}: loss {loss}, gradient norm {grad_norm}"
    if policy == "skip" and in_a_row < MAX_SKIPPED_IN_A_ROW:
        log(f"{what} is not finite; update skipped (train.on_nonfinite=skip)")
        return
    if policy == "skip":
        what += f" (the {in_a_row}th non-finite step in a row: the run is not learning)"
    ckpts = checkpoint.all_checkpoints(run_dir)
    kept = f"the last checkpoint is {ckpts[-1]}" if ckpts else "no checkpoint was written yet"
    raise TunesmithError(f"{what} is not finite; training stopped ({kept}). Try a lower train.lr, "
                         f"train.max_grad_norm, or train.on_nonfinite=skip to skip such steps")
