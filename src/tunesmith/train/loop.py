"""One training run in three parts: `setup` (machine -> assembled run -> objective -> baseline -> optimizer and plan)
-> `fit` (the loop) -> `finish` (final/ on disk, then the closing evaluation), over one record of what the loop and the
finish read (`Session`).

Plain PyTorch, no Trainer: we own batching (length-grouped, right-padded, no attention mask), the loss head
(vocabulary projection only where labels exist), the thread policy, and exact resume (the batch order is a pure
function of seed and epoch, data/batching.py's `step_plan`, so a resumed run starts the plan at its checkpoint's step
without touching data, restores weights/optimizer/RNG and continues bit for bit). What a step optimises and how the
model is measured is the objective's (tunesmith/objectives); this file keeps what every objective shares: forward
passes and accumulation, sharding over processes, the cadence of evaluations and checkpoints, the time budget and stop
requests. `Session` is a record of fields, not a class to subclass, and there are no callbacks: the objective's hooks
are the one extension point.
"""
from __future__ import annotations

import contextlib
import functools
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tunesmith.assemble import Run, assemble
from tunesmith.config import Config, changed_settings, dump_yaml, read_yaml, unused_settings
from tunesmith.data.batching import collate, effective_length, split_passes, step_plan
from tunesmith.data.render import prompt_format_of
from tunesmith.errors import TunesmithError
from tunesmith.evaluate.alarms import rl_alarms
from tunesmith.evaluate.closing import TRAINED, Closing, close, improves, open_baseline, write_final
from tunesmith.evaluate.side_by_side import format_table, rouge_applies
from tunesmith.methods import lora
from tunesmith.methods.precision import WeightCopies, resume_note
from tunesmith.models import neftune, pick_device
from tunesmith.objectives import Context, Objective, objective_for
from tunesmith.run import RunDir
from tunesmith.run.files import append_jsonl, publish_dir, write_json_atomic, write_text_atomic
from tunesmith.run.layout import choose_run_dir, create_run_dir
from tunesmith.run.lock import RunLock
from tunesmith.run.log import RunLog, progress_bar
from tunesmith.run.trackers import Trackers, check_installed
from tunesmith.train import checkpoint, distributed, zero
from tunesmith.train.checkpoint import Checkpoint
from tunesmith.train.console import data_lines, result_lines
from tunesmith.train.distributed import Dist
from tunesmith.train.interrupt import StopRequests, TrainingInterrupted
from tunesmith.train.machine import available_cores, configure_threads, keep_heap_memory
from tunesmith.train.plan import estimate
from tunesmith.train.progress import Progress
from tunesmith.train.schedule import budget_steps, lr_at, make_optimizer, plan_steps, warmup_steps


@dataclass
class RunResult:
    run_dir: Path
    summary: dict


@dataclass
class Session:
    """What `fit` and `finish` read, built by `setup`. The plan fields (`total_steps`, `warmup`) and `progress` change
    as training runs (a time budget re-plans; every step counts); `fit` fills in the last two."""
    cfg: Config                    # as the run trains it (train.batch_tokens as used)
    run: Run                       # the assembled run: task, tokenizer, data, precision, fingerprint, method
    dist: Dist                     # this process among torchrun's (rank 0 alone writes)
    device: torch.device
    threads: int
    started: float                 # time.perf_counter() at the start: rows' "elapsed", eval.json's wall_seconds
    log: RunLog
    run_dir: RunDir
    replaced: Path | None          # the run an --overwrite replaces, deleted once this one is trained
    trackers: Trackers
    model: torch.nn.Module
    trainable: list[torch.Tensor]
    copies: WeightCopies | None    # bfloat16 copies of the weights the training passes run on, or None
    objective: Objective
    optimizer: torch.optim.Optimizer
    engine: object | None          # DeepSpeed ZeRO's engine (it runs backward and the optimizer step), or None
    baseline: dict                 # the base's "before" metrics and "base_outputs"
    base_general: dict | None      # the base on general text (the forgetting check), or None
    lengths: list[int]             # each training example's trained length in tokens
    weights: list[int]             # what each training example's loss is averaged over
    repeats: int                   # optimizer steps on one batch (online RL's updates per batch of rollouts)
    global_batch: int              # examples per optimizer step over every process
    steps_per_epoch: int
    step_cap: int                  # the most steps: train.max_steps or the epochs' steps
    budget: float | None           # train.max_minutes in seconds, or None
    total_steps: int               # the plan; re-planned from the measured pace under a time budget
    warmup: int
    peak_lr: float
    progress: Progress
    ckpt: Checkpoint | None        # the checkpoint this launch resumed from
    local_examples: int = 0        # examples this process trained on (the sharding test counts them)
    loop_seconds: float = 0.0
    rows: list[dict] = field(default_factory=list)  # the metrics rows this launch recorded (the RL alarms read them)
    alarmed: set[str] = field(default_factory=set)  # the RL alarms train.log has already said

    @property
    def joins_forwards(self) -> bool:
        """Rank-0-only forwards (generation, ...) need every rank under FSDP."""
        return self.dist.main or self.dist.fsdp

    def training_passes(self):
        """Where a step's forward and backward passes run: on the bfloat16 copies of the weights, when the run has them."""
        return _training_passes(self.copies)

    def measure(self, m) -> dict:
        return _measure(self.objective, self.dist, m)

    def record(self, row: dict) -> None:
        _record(self.run_dir, self.trackers, self.dist, row)
        if self.dist.main and (row.get("reward") is not None or row.get("eval_reward") is not None):
            self.rows.append(row)  # an online-RL row: the alarms the studio's RL panel shows, said once in train.log
            for alarm in rl_alarms(self.rows, self.cfg.rl.max_new_tokens):
                if alarm.kind not in self.alarmed:
                    self.alarmed.add(alarm.kind)
                    self.log(f"warning (step {alarm.step}): {alarm.message}")


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
        s = setup(cfg, resume, force_resume, force, overwrite, held)
        with StopRequests(announce=s.dist.main) as stop:
            fit(s, stop)
            summary, closing = finish(s, stop)
        return _report(s, summary, closing)


# -- setup: everything before the first step ----------------------------------------------------------------------

def setup(cfg: Config, resume: Path | None, force_resume: bool, force: bool, overwrite: bool,
          held: contextlib.ExitStack) -> Session:
    """The machine, the run directory (chosen, locked, written only once the inputs are good), the assembled run, the
    objective and its preparation, the base's baseline, the optimizer, the plan and the resume point."""
    started = time.perf_counter()
    device = pick_device()
    ddp = distributed.setup(device, cfg.train.distributed, cfg.train.process_timeout_minutes)  # or this rank of several
    threads = configure_threads(cfg.train.threads or (max(1, available_cores() // ddp.local_world) if ddp.active else None))
    keep_heap_memory()
    seed_everything(cfg.train.seed)
    run_dir, resuming, restart = _choose_run_dir(cfg, resume, overwrite, held, ddp)
    log = RunLog(enabled=ddp.main)  # rank 0 alone writes logs and files
    if restart:
        log(f"output.resume=auto: {run_dir} stopped before its first checkpoint; starting it again")
    log(f"tunesmith: {'resuming' if resuming else 'run'} {run_dir} | device {device.type}, {threads} threads"
        + (f", {ddp.world} processes ({cfg.train.distributed})" if ddp.active else ""))
    if cfg.train.distributed != "ddp" and not ddp.active:
        log(f"train.distributed={cfg.train.distributed} takes effect with several processes (--nproc N); one process trains as is")

    # the run: model folder, tokenizer, data, task, precision, method, model
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
    _place_model(model, cfg, ddp)
    trainable = [p for p in model.parameters() if p.requires_grad]
    copies = WeightCopies(model) if precision.weight_copies else None  # bfloat16 ones for training passes
    objective = objective_for(run.task, cfg, run.data, run.tokenizer, precision.dtype)
    measure = functools.partial(_measure, objective, ddp)
    ctx = Context(device, log, ddp.main, functools.partial(distributed.from_main, None, ddp),
                  functools.partial(_as_in_training, precision, device, copies), measure, run_dir.teacher_topk,
                  cfg.train.batch_tokens)
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * ddp.world
    objective.load(ctx, plan_steps(cfg, len(objective.train), ddp.world)[1] * global_batch)  # a teacher (its answers)
    lengths = [effective_length(t) for t in objective.train]
    repeats = objective.steps_per_batch  # RL: optimizer steps on one batch of rollouts
    steps_per_epoch, total_steps = plan_steps(cfg, len(lengths), ddp.world, repeats)
    _refuse_if_unfit(run, model, total_steps, force, log)
    check_installed(cfg.train.report_to)
    # inputs are good: now the run directory may be created (or an old one replaced with --overwrite)
    ckpt = checkpoint.resume_point(run_dir, run.fingerprint, force_resume, log) if resuming else None
    replaced = _write_run_dir(run_dir, cfg, resuming, overwrite or bool(restart), held, log) if ddp.main else None
    trackers = Trackers(cfg.train.report_to if ddp.main else [], run_dir.path, cfg.model_dump(), resumed=resuming)

    # before training: the objective's own preparation, the base's held-out metrics and outputs
    objective.prepare(model, ctx)  # reference log-probs (DPO); the teacher's metrics and cache (distillation)
    baseline, base_general = open_baseline(run_dir, objective, model, run.tokenizer, measure,
                                           functools.partial(_record, run_dir, trackers, ddp), resuming, ddp.main,
                                           ddp.main or ddp.fsdp)
    if baseline["before"]:
        log("held-out before training: " + objective.describe(baseline["before"]))

    # optimizer, schedule, resume point
    budget = cfg.train.max_minutes * 60 if cfg.train.max_minutes else None
    step_cap = total_steps
    if budget:  # a first plan from this machine's measured matmul speed; re-planned from real steps in fit
        total_steps = _first_budget_plan(run, model, budget, step_cap, log)
    warmup = warmup_steps(cfg.train.warmup, total_steps)
    peak_lr = cfg.train.lr or run.method.default_lr
    optimizer, engine = _optimizer(cfg, model, trainable, peak_lr, ddp, log)
    log(f"plan: {total_steps} steps x {cfg.train.micro_batch_size * cfg.train.grad_accum} examples "
        f"({total_steps / steps_per_epoch:.2f} epochs), peak lr {peak_lr:g}"
        + (f" (LoRA B matrices {peak_lr * cfg.method.loraplus_lr_ratio:g})" if cfg.method.loraplus_lr_ratio else "")
        + f", {cfg.train.schedule} schedule, {warmup} warm-up steps")
    progress = Progress(planned_steps=total_steps, global_batch=global_batch, precision=precision.settings(),
                        fingerprint=run.fingerprint)
    s = Session(cfg=cfg, run=run, dist=ddp, device=device, threads=threads, started=started, log=log, run_dir=run_dir,
                replaced=replaced, trackers=trackers, model=model, trainable=trainable, copies=copies, objective=objective,
                optimizer=optimizer, engine=engine, baseline=baseline, base_general=base_general, lengths=lengths,
                weights=[objective.weight(t) for t in objective.train], repeats=repeats, global_batch=global_batch,
                steps_per_epoch=steps_per_epoch, step_cap=step_cap, budget=budget, total_steps=total_steps,
                warmup=warmup, peak_lr=peak_lr, progress=progress, ckpt=ckpt)
    if ckpt:
        _resume(s, ckpt)
    return s


def _choose_run_dir(cfg: Config, resume: Path | None, overwrite: bool, held: contextlib.ExitStack,
                    ddp: Dist) -> tuple[RunDir, bool, bool]:
    """(run directory, resuming, restart): rank 0 alone picks and locks it; every rank learns rank 0's choice.
    `restart`: output.resume=auto found a run that stopped before its first checkpoint (it starts again)."""
    resumable = restart = None
    chosen = None
    if ddp.main:
        resumable, restart = checkpoint.auto_resume_dir(cfg.output, overwrite)
        chosen = resume or resumable
        if chosen is not None:  # one writer per run: a live run is never resumed a second time
            if Path(chosen).is_dir():
                held.enter_context(RunLock(chosen).acquire("training (resumed)"))
        else:
            chosen = choose_run_dir(cfg.output.dir, cfg.output.name, cfg.recipe, overwrite or restart).path
    run_dir = RunDir(distributed.from_main(chosen if ddp.main else None, ddp))
    resuming = distributed.from_main((resume or resumable) is not None if ddp.main else None, ddp)
    return run_dir, resuming, restart


def _place_model(model, cfg: Config, ddp: Dist) -> None:
    """Gradient checkpointing, and FSDP's sharding of weights, gradients and optimizer state over the processes."""
    if cfg.train.gradient_checkpointing:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if ddp.fsdp:
        distributed.shard_model(model, ddp)
        lora.keep_merged(model, False)  # nor whole merged LoRA weights kept between updates


def _training_passes(copies: WeightCopies | None):
    return copies.swapped_in() if copies else contextlib.nullcontext()


@contextlib.contextmanager
def _as_in_training(precision, device, copies):
    """The precision and weights training passes compute with (a reference pass matches them)."""
    with precision.context(device), _training_passes(copies):
        yield


def _measure(objective: Objective, ddp: Dist, m) -> dict:
    if objective.measure_shards and not ddp.fsdp:  # each rank scores its share; the sums are combined
        return distributed.combine_heldout(objective.measure(m, distributed.shard(objective.val, ddp)), ddp)
    return objective.measure(m, objective.val)  # every rank scores the whole split (FSDP: every forward is a collective)


def _record(run_dir: RunDir, trackers: Trackers, ddp: Dist, row: dict) -> None:
    """A metrics.jsonl row, and the trackers' (rank 0)."""
    if ddp.main:
        append_jsonl(run_dir.metrics, row)
        trackers.log(row)


def _refuse_if_unfit(run: Run, model, total_steps: int, force: bool, log) -> None:
    memory = estimate(run.effective_config, model, run.params["trainable"], run.data.stats, total_steps)
    if not memory.fits:
        if not force:
            raise TunesmithError(f"this run would not fit in memory:\n{memory.describe()}\n(pass --force to try anyway)")
        log(f"warning: the memory estimate ({memory.total / 2**30:.1f} GiB) exceeds what is available; going on (--force)")


def _write_run_dir(run_dir: RunDir, cfg: Config, resuming: bool, replace: bool, held: contextlib.ExitStack,
                   log: RunLog) -> Path | None:
    """Create (or, `replace`, replace) the run directory and lock it, or note a resume's changed settings; then
    config.yaml and train.log (rank 0). Returns the folder an --overwrite keeps until this run is trained."""
    replaced = None
    if not resuming:
        replaced = create_run_dir(run_dir, replace)
        held.enter_context(RunLock(run_dir.path).acquire("training"))
        if replaced:
            log(f"replacing {run_dir} (--overwrite): the run it replaces is kept in {replaced} until this one is trained")
    elif changed := changed_settings(read_yaml(run_dir.config), cfg.model_dump(mode="json")):
        log("resuming with changed settings (config.yaml now has the new ones): " + "; ".join(changed))
    write_text_atomic(run_dir.config, dump_yaml(cfg))
    log.attach(run_dir.log)
    return replaced


def _first_budget_plan(run: Run, model, budget: float, step_cap: int, log) -> int:
    """Steps that fit train.max_minutes at this machine's measured matmul speed (fit re-plans from real steps)."""
    cfg = run.effective_config
    guess = estimate(cfg, model, run.params["trainable"], run.data.stats, step_cap, time_it=0.5,
                     matmuls=run.precision.matmuls).seconds / step_cap
    total_steps = max(1, min(step_cap, int(budget / guess)))
    log(f"time budget {cfg.train.max_minutes:g} min: first plan {total_steps} steps (~{guess:.1f} s/step estimated), "
        f"re-planned from the measured pace as training runs")
    return total_steps


def _optimizer(cfg: Config, model, trainable: list, peak_lr: float, ddp: Dist, log) -> tuple[torch.optim.Optimizer, object]:
    """(optimizer, DeepSpeed ZeRO's engine or None): LoRA+ parameter groups where asked; under ZeRO its engine runs
    backward and the optimizer step (train/zero.py)."""
    groups = lora.param_groups(model, cfg.method.loraplus_lr_ratio) if cfg.method.loraplus_lr_ratio else trainable
    optimizer = make_optimizer(cfg.train.optimizer, groups, peak_lr, cfg.train.weight_decay, log)
    engine = None
    if ddp.zero:
        engine, optimizer = zero.wrap(model, optimizer, cfg.train, ddp.world)
        log(f"DeepSpeed ZeRO stage {cfg.train.zero_stage}: optimizer state"
            + (" and gradients" if cfg.train.zero_stage == 2 else "") + f" partitioned over {ddp.world} processes")
    return optimizer, engine


def _resume(s: Session, ckpt: Checkpoint) -> None:
    """The checkpoint's weights, optimizer state and progress into the session, refusing what cannot continue."""
    if note := resume_note(ckpt.progress.precision, s.run.precision, s.cfg, ckpt.step):
        s.log(note)  # auto resolved differently on another machine or backend
    if (saved := checkpoint.restore(ckpt, s.model, s.optimizer)) is not None:
        s.objective.restore_state(saved)  # RL between two updates on one batch of rollouts: that batch
    s.progress = progress = ckpt.progress.continued(s.progress)
    s.total_steps = progress.planned_steps if s.budget else s.total_steps
    if progress.global_batch != s.global_batch:
        raise TunesmithError(f"{ckpt.path} was trained with a global batch of {progress.global_batch} examples; this launch "
                             f"has {s.global_batch} (micro_batch_size x grad_accum x processes); set train.grad_accum to match")
    checkpoint.truncate_metrics(s.run_dir, ckpt.step)
    stale = checkpoint.best_step(s.run_dir) if s.dist.main and s.run_dir.best.exists() else None
    if stale is not None and stale != (progress.best or {}).get("step"):
        shutil.rmtree(s.run_dir.best)  # written after this checkpoint, by steps that run again: not this run's best
        s.log(f"best/ held step {stale}'s weights, from after {ckpt.path.name}: discarded")
    s.log(f"resumed from {ckpt.path.name}: step {ckpt.step} of {s.total_steps}")
    if ckpt.step >= s.total_steps:
        raise TunesmithError(f"{ckpt.path} is at step {ckpt.step}, the plan has {s.total_steps}; raise train.max_steps to train further")


# -- fit: the loop ------------------------------------------------------------------------------------------------

def fit(s: Session, stop: StopRequests) -> None:
    """Optimizer steps from the session's progress to its plan: learning rate, passes and backward, reduce, clip and
    step, non-finite handling, counters, the budget's re-plan, the metrics row, evaluations and checkpoints."""
    cfg, ddp, objective, progress = s.cfg, s.dist, s.objective, s.progress
    split = functools.partial(split_passes, lengths=s.lengths, batch_tokens=cfg.train.batch_tokens,
                              micro_batch_size=objective.examples_per_pass or cfg.train.micro_batch_size)
    plan = step_plan(s.lengths, s.global_batch, cfg.train.seed, s.repeats, start=progress.step)  # a resume starts at its step
    remove_noise = neftune.add_noise(s.model, cfg.train.neftune_noise_alpha) if cfg.train.neftune_noise_alpha else None
    s.model.train()
    t_loop = time.perf_counter()
    bar = progress_bar(s.total_steps, "train", "step", disable=not ddp.main, initial=progress.step)
    skipped_in_a_row = 0
    step = progress.step - 1
    while step + 1 < s.total_steps:
        step += 1
        t0 = time.perf_counter()
        for group in s.optimizer.param_groups:
            group["lr"] = group.get("lr_scale", 1.0) * s.peak_lr * lr_at(step, s.total_steps, s.warmup, cfg.train.schedule)
        epoch, step_examples = next(plan)
        passes = distributed.equal_passes(step_examples, ddp, split)  # this rank's share, in forward passes
        step_loss, grad_norm, finite = _step(s, step, passes, step_examples)
        skipped_in_a_row = 0 if finite else skipped_in_a_row + 1
        if not finite:
            _non_finite(step + 1, step_loss, grad_norm, cfg.train.on_nonfinite, s.run_dir, s.log, skipped_in_a_row)
            progress.skipped_steps.append(step + 1)
        progress.train_seconds += time.perf_counter() - t0
        progress.tokens += sum(s.lengths[i] for i in step_examples)
        progress.examples += len(step_examples)
        s.local_examples += sum(len(p) for p, real in passes if real)
        progress.step = step + 1
        if step == 0:
            progress.first_step_seconds = progress.train_seconds
        if s.budget:  # rank 0's clock decides for everyone
            s.total_steps = distributed.from_main(budget_steps(s.budget, s.step_cap, step + 1, progress.train_seconds,
                                                               progress.first_step_seconds), ddp)
            progress.planned_steps = bar.total = s.total_steps
            s.warmup = warmup_steps(cfg.train.warmup, s.total_steps)
        tok_s = progress.tokens / progress.train_seconds
        record = {"step": step + 1, "total_steps": s.total_steps, "epoch": round(progress.examples / s.repeats / len(s.lengths), 4),
                  "loss": round(step_loss, 5), "lr": s.optimizer.param_groups[0]["lr"], "grad_norm": round(grad_norm, 4),
                  "tokens": progress.tokens, "tok_s": round(tok_s, 1), "elapsed": round(time.perf_counter() - s.started, 2),
                  **objective.step_metrics()}
        bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tok_s:.0f}", epoch=epoch, refresh=False)
        bar.update(1)
        last = step + 1 == s.total_steps
        evaluating = cfg.eval.every_steps and (step + 1) % cfg.eval.every_steps == 0
        evaluating = evaluating or (cfg.eval.each_epoch and (step + 1) % s.steps_per_epoch == 0)
        if evaluating and not last:
            _evaluate(s, step, record)
        if (step + 1) % cfg.train.log_every_steps == 0 or last or "eval_loss" in record:
            s.record(record)
        _checkpoint_or_stop(s, stop, step, record, last, bar)
    bar.close()
    s.loop_seconds = time.perf_counter() - t_loop
    if remove_noise:
        remove_noise()


def _step(s: Session, step: int, passes: list[tuple[list[int], bool]], step_examples: list[int]) -> tuple[float, float, bool]:
    """One optimizer step's passes, backward, reduction over the processes, clipping and update:
    (the step's loss, the gradient norm, whether both are finite; a non-finite step updates nothing)."""
    objective, ddp, engine = s.objective, s.dist, s.engine
    batches = [collate([objective.train[i] for i in p], objective.pad_id, s.device) for p, _ in passes]
    label_tokens = sum(s.weights[i] for i in step_examples)  # normalise by the whole global step's labels
    step_loss = 0.0
    with s.training_passes():  # on bfloat16 copies of the weights, when the run uses them
        objective.begin_step(s.model, [i for p, _ in passes for i in p], step)  # RL: the rollouts
        for (p, real), batch in zip(passes, batches):
            with s.run.precision.context(s.device):
                loss = objective.loss(s.model, batch, p) / label_tokens
            # FSDP, ZeRO: x world undoes their average over ranks; a filler pass joins the collectives, counts nothing
            scaled = loss * (distributed.grad_scale(ddp) if real else 0.0)
            if engine is not None:
                zero.backward(engine, scaled, last_pass=batch is batches[-1])
            else:
                scaled.backward()
            step_loss += float(loss.detach()) if real else 0.0
    distributed.all_reduce_grads(s.trainable, ddp)
    step_loss = distributed.sum_float(step_loss, ddp)
    if engine is not None:  # ZeRO clips and steps each rank's partition; a non-finite loss stops before it
        grad_norm = zero.step(engine) if math.isfinite(step_loss) else float("nan")
    else:
        grad_norm = _grad_norm(s.trainable, s.cfg.train.max_grad_norm)
    finite = math.isfinite(step_loss) and math.isfinite(grad_norm)
    if finite and engine is None:
        s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm, finite


def _evaluate(s: Session, step: int, record: dict) -> None:
    """Held-out metrics into this step's row; with train.select_best, best/ when they beat every earlier evaluation."""
    record.update(s.measure(s.model))
    s.progress.evals.append(record)
    s.log(f"step {step + 1}: " + s.objective.describe(record))
    if improves(s.cfg.train.select_best, record, s.progress.best, s.run.task):
        best_weights = distributed.full_weights(s.model, keep=s.dist.main)  # a collective under FSDP
        saved = checkpoint.save_best(s.run_dir, best_weights, record, s.log) if s.dist.main else None
        if distributed.from_main(saved, s.dist):  # a best/ that could not be written is not claimed
            s.progress.best = {"step": step + 1, "value": record[s.cfg.train.select_best]}


def _checkpoint_or_stop(s: Session, stop: StopRequests, step: int, record: dict, last: bool, bar) -> None:
    """A checkpoint when one is due or a stop was requested (decided by every process together); then, on a stop
    request, end the run resumably (TrainingInterrupted). After the last step neither: final/ and finish follow."""
    cfg, ddp = s.cfg, s.dist
    due = cfg.train.save_every_steps and (step + 1) % cfg.train.save_every_steps == 0
    due = due or (cfg.train.save_each_epoch and (step + 1) % s.steps_per_epoch == 0)
    stopping = distributed.any_true(stop.requested, ddp)
    written = None
    if (due or stopping) and not last:
        state = distributed.full_weights(s.model, ddp.main), distributed.full_optimizer_state(s.optimizer, ddp.main)
        kept = s.objective.resume_state()  # every rank: RL gathers the processes' rollouts
        if ddp.main:
            s.progress.eval_loss = record.get("eval_loss")
            written = checkpoint.save_or_warn(s.run_dir, *state, s.progress, cfg.train.keep_checkpoints, s.log, kept)
    if stopping and not last:
        bar.close()
        s.trackers.close()
        distributed.finish(ddp)
        s.log(f"{stop.signal_name or 'a signal'}: stopped after step {step + 1} of {s.total_steps}")
        older = checkpoint.all_checkpoints(s.run_dir)
        saved = ("checkpoint written" if written else "the checkpoint could not be written (see above); "
                 + (f"the last one is {older[-1].name}" if older else "there is no checkpoint to resume from"))
        raise TrainingInterrupted(f"stopped by {stop.signal_name or 'a signal'} after step {step + 1} of {s.total_steps}; "
                                  f"{saved}", f"tunesmith train --resume {s.run_dir}")


# -- finish: the trained weights on disk first, then the closing evaluation ----------------------------------------

def finish(s: Session, stop: StopRequests) -> tuple[dict, Closing]:
    """final/ and eval.json in state "trained" (what `tunesmith eval` completes if the run stops from here on), then
    the closing evaluation (evaluate/closing.py): (eval.json as it ends, what the closing evaluation measured)."""
    cfg, ddp, run_dir, progress = s.cfg, s.dist, s.run_dir, s.progress
    save_final = functools.partial(_save_final, s, prompt_format_of(cfg.data.template, cfg.data.system_prompt,
                                                                    s.run.data.val.examples))
    summary = _summary(s, distributed.gather(s.local_examples, ddp))
    if ddp.main:
        write_json_atomic(run_dir.summary, summary)
    save_final()
    if ddp.main and s.replaced is not None:
        shutil.rmtree(s.replaced, ignore_errors=True)
        s.log(f"the run it replaced ({s.replaced}) is deleted")
    complete_with = f"tunesmith eval {run_dir}"
    stopped = TrainingInterrupted(f"stopped during the closing evaluation; the trained model is saved in {run_dir.final} "
                                  f"(the run is trained, its evaluation incomplete)", complete_with, "complete it with")
    if distributed.any_true(stop.requested, ddp):  # asked to stop during the last step: the weights are saved
        s.trackers.close()
        distributed.finish(ddp)
        raise stopped
    stop.stop_at_once(stopped)  # from here a signal stops the evaluation at once: nothing it would lose
    closing = Closing(run_dir, s.objective, s.model, s.total_steps, s.baseline, s.base_general, s.measure, save_final,
                      functools.partial(checkpoint.load_best, run_dir, s.model), s.record, cfg.train.select_best,
                      progress.best, ddp.main, s.joins_forwards, s.log, started=s.started)
    try:
        summary = close(closing, summary)
    except TrainingInterrupted:
        s.trackers.close()
        raise
    except Exception as e:
        if not ddp.main:
            raise
        raise TunesmithError(f"the closing evaluation failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                             f"the trained model is saved in {run_dir.final}: complete the evaluation with "
                             f"{complete_with}") from e
    stop.stop_at_once(None)
    return summary, closing


def _save_final(s: Session, prompts) -> None:
    """final/: a collective under FSDP (every rank gathers), rank 0 writes."""
    full_state = distributed.full_state_dict(s.model) if s.dist.fsdp else None
    if s.dist.main:
        _publish_final(s.run_dir, lambda folder: write_final(folder, s.model, s.run.tokenizer, s.cfg, s.run.task, s.objective,
                                                             prompts, full_state))


def _summary(s: Session, examples_per_rank: list[int]) -> dict:
    """eval.json as training writes it (state "trained"); the closing evaluation adds what it measures."""
    cfg, progress, precision = s.cfg, s.progress, s.run.precision
    tokens_seen, train_seconds = progress.tokens, progress.train_seconds
    return {
        "run_dir": str(s.run_dir), "state": TRAINED, "task": s.run.task, "method": cfg.method.name,
        "dtype": precision.dtype_name, "mixed_precision": "bf16" if precision.autocast else None, "best": progress.best,
        "model": cfg.model.name, "params": s.run.params, "data": s.run.data.stats, "steps": s.total_steps, "tokens": tokens_seen,
        "train_seconds": round(train_seconds, 1), "loop_seconds": round(s.loop_seconds, 2),
        "tok_s": round(tokens_seen / max(train_seconds, 1e-9), 1), "threads": s.threads, "before": s.baseline["before"],
        "after": None, "evals": progress.evals, "skipped_steps": progress.skipped_steps,
        "teacher": getattr(s.objective, "teacher_metrics", None), "resumed_from": s.ckpt.step if s.ckpt else None,
        "epochs": round(progress.examples / s.repeats / len(s.lengths), 3), "examples": progress.examples,
        "budget_minutes": cfg.train.max_minutes, "processes": s.dist.world, "global_batch": s.global_batch,
        "examples_per_rank": examples_per_rank, "side_by_side": [], "forgetting": None,
    }


def _report(s: Session, summary: dict, closing: Closing) -> RunResult:
    """What a finished run prints (rank 0), and the processes' group closed."""
    ddp, log, cfg = s.dist, s.log, s.cfg
    s.trackers.close()
    if not ddp.main:  # the other ranks are done: rank 0 reports
        distributed.finish(ddp)
        return RunResult(s.run_dir.path, {"after": closing.result["after"], "rank": ddp.rank})
    rows, after, drift = summary["side_by_side"], summary["after"], summary["forgetting"]
    if rows:
        log(format_table(rows, ["base", "tuned"], generated=rouge_applies(rows, s.objective.generates)))
    for line in result_lines(s.objective, s.baseline["before"], after, rows, drift):
        log(line)
    log(f"trained {s.total_steps} steps ({summary['epochs']:.2f} epochs) on {s.progress.tokens:,} tokens in "
        f"{s.progress.train_seconds:.0f} s ({summary['tok_s']:.0f} tok/s)"
        + (f" within the {cfg.train.max_minutes:g}-minute budget" if s.budget else "")
        + f"; total {summary['wall_seconds']:.0f} s")
    log(f"report: {s.run_dir.report}")
    distributed.finish(ddp)
    log(f"saved: {s.run_dir.final}  (try: tunesmith generate --run {s.run_dir} \"...\"; tunesmith eval {s.run_dir})")
    return RunResult(s.run_dir.path, summary)


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
