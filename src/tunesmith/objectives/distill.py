"""Knowledge distillation around the student's own objective (sft or classification): a teacher's soft targets for
the student, on the response tokens (or the class logits).

    loss = alpha * CE(labels) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

(`distill.kl: reverse` swaps the KL's arguments.) The teacher runs on the fly in no-grad eval mode
on the same batch; only labelled positions go through the vocabulary head, for student and teacher
alike. Classification distils class logits the same way. `distill.mode: sequence` instead replaces
every training response with the teacher's greedy answer to its prompt (tokenizers may differ).

`distill.top_k: K` runs the teacher once over the training split before training and keeps, per
response token, only its K largest logits and their token ids, in memory-mapped files in the run
directory (K x 6 bytes per token; never the full vocabulary). The teacher is then freed, and every
epoch distils against the cache: the teacher's distribution renormalised over its top K, the
student's log-probabilities (over the full vocabulary) at those K ids.

The student's objective measures both models on the held-out split, shows the samples and describes the results:
distillation changes what a step's loss is, not how the run is judged.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tunesmith.data.batching import collate, split_passes
from tunesmith.data.prepare import tokenize_split
from tunesmith.data.render import Split, Tokenized
from tunesmith.data.shapes import Example
from tunesmith.errors import TunesmithError
from tunesmith.methods.load import load_model, merge_adapter
from tunesmith.models import load_tokenizer, model_fingerprint, resolve_model_dir
from tunesmith.models.generate import Sampling, generate
from tunesmith.models.heads import label_logits
from tunesmith.objectives import Context, Objective

TOPK_VERSION = 1


def distill_terms(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, cfg) -> torch.Tensor:
    """Summed over positions (normalise outside)."""
    t = cfg.temperature
    log_s, log_t = F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1)
    if cfg.kl == "forward":
        kl = (log_t.exp() * (log_t - log_s)).sum()
    else:
        kl = (log_s.exp() * (log_s - log_t)).sum()
    ce = F.cross_entropy(student, targets, reduction="sum")
    return cfg.alpha * ce + (1 - cfg.alpha) * t * t * kl


def distill_sum_loss(model, teacher, batch, cfg) -> torch.Tensor:
    if batch.classes is not None:  # classification: class logits
        student = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
        with torch.no_grad():
            teach = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
        return distill_terms(student, teach, batch.classes, cfg)
    student, targets = label_logits(model, batch.input_ids, batch.labels)
    with torch.no_grad():
        teach, _ = label_logits(teacher, batch.input_ids, batch.labels)
    if teach.shape[-1] != student.shape[-1]:
        raise TunesmithError(f"teacher vocabulary ({teach.shape[-1]}) differs from the student's ({student.shape[-1]})")
    return distill_terms(student, teach, targets, cfg)


def sparse_distill_terms(student: torch.Tensor, top_ids: torch.Tensor, top_logits: torch.Tensor, targets: torch.Tensor,
                         cfg) -> torch.Tensor:
    """distill_terms (forward KL) against a teacher known only by its top-k logits, renormalised over those k."""
    t = cfg.temperature
    log_s = F.log_softmax(student / t, -1).gather(-1, top_ids)
    log_t = F.log_softmax(top_logits / t, -1)
    kl = (log_t.exp() * (log_t - log_s)).sum()
    ce = F.cross_entropy(student, targets, reduction="sum")
    return cfg.alpha * ce + (1 - cfg.alpha) * t * t * kl


@dataclass
class TopKCache:
    """Per training example, its response tokens' teacher top-k (ids, logits): rows offsets[i]:offsets[i+1]."""
    offsets: np.ndarray
    ids: np.ndarray  # (label tokens, k) int32, memory-mapped
    logits: np.ndarray  # (label tokens, k) float16, memory-mapped

    def rows(self, examples: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of these examples in order (the order label_logits returns a batch's positions in)."""
        spans = [np.arange(self.offsets[i], self.offsets[i + 1]) for i in examples]
        at = np.concatenate(spans) if spans else np.zeros(0, dtype=np.int64)
        return torch.from_numpy(self.ids[at].astype(np.int64)), torch.from_numpy(self.logits[at].astype(np.float32))


def cached_distill_sum_loss(model, batch, cached: tuple[torch.Tensor, torch.Tensor], cfg) -> torch.Tensor:
    student, targets = label_logits(model, batch.input_ids, batch.labels)
    top_ids, top_logits = (x.to(student.device) for x in cached)
    return sparse_distill_terms(student, top_ids, top_logits, targets, cfg)


def teacher_topk(teacher, tokens: list, k: int, folder: Path, pad_id: int, device, batch_tokens: int, log,
                 build: bool = True, teacher_id: str = "") -> TopKCache:
    """Build (or reuse, when complete and matching) the teacher's top-k cache for these training examples; with
    `build=False`, wait until another process has built it."""
    counts = np.array([int((t.labels[1:] != -100).sum()) for t in tokens], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    shape, key = (int(offsets[-1]), k), {"version": TOPK_VERSION, "k": k, "examples": len(tokens), "tokens": int(offsets[-1]),
                                         "teacher": teacher_id}  # another teacher's logits are never reused
    done = folder / "done.json"
    while not build and not (done.exists() and json.loads(done.read_text()) == key):
        time.sleep(0.5)
    if done.exists() and json.loads(done.read_text()) == key:
        log(f"distill.top_k={k}: the teacher's top-{k} logits from {folder} ({shape[0]:,} response tokens)")
        return TopKCache(offsets, np.load(folder / "ids.npy", mmap_mode="r"), np.load(folder / "logits.npy", mmap_mode="r"))
    folder.mkdir(parents=True, exist_ok=True)
    done.unlink(missing_ok=True)
    ids = np.lib.format.open_memmap(folder / "ids.npy", mode="w+", dtype=np.int32, shape=shape)
    logits = np.lib.format.open_memmap(folder / "logits.npy", mode="w+", dtype=np.float16, shape=shape)
    lengths = [len(t.input_ids) for t in tokens]
    passes = split_passes(sorted(range(len(tokens)), key=lengths.__getitem__), lengths, 64, batch_tokens)
    log(f"distill.top_k={k}: one teacher pass over {len(tokens)} training examples ({shape[0]:,} response tokens, "
        f"{shape[0] * k * 6 / 2**20:.0f} MiB on disk)")
    teacher.eval()
    with torch.no_grad():
        for group in passes:  # similar lengths share a pass, within the token budget
            batch = collate([tokens[i] for i in group], pad_id, device)
            top = label_logits(teacher, batch.input_ids, batch.labels)[0].topk(k, dim=-1)
            at = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in group])
            ids[at] = top.indices.cpu().numpy().astype(np.int32)
            logits[at] = top.values.cpu().numpy().astype(np.float16)
    ids.flush()
    logits.flush()
    for f in (folder / "ids.npy", folder / "logits.npy"):  # on disk before done.json says they are complete
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    done.write_text(json.dumps(key))
    return TopKCache(offsets, np.load(folder / "ids.npy", mmap_mode="r"), np.load(folder / "logits.npy", mmap_mode="r"))


def check_tokenizers(student_tok, teacher_tok, mode: str) -> None:
    if mode == "logits" and student_tok.get_vocab() != teacher_tok.get_vocab():
        raise TunesmithError("distill.mode=logits needs the teacher and student to share a tokenizer (they do not); "
                             "use distill.mode=sequence to train the student on the teacher's generated answers instead")


def teacher_answers(teacher, tokenizer, data, cfg, n: int, log, show_progress: bool = True) -> Split:
    """`distill.mode: sequence`: the training split with its first `n` responses replaced by the teacher's greedy
    answers to their prompts."""
    from collections import Counter

    examples, rendered = data.train.examples[:n], data.train.rendered[:n]
    log(f"distill.mode=sequence: the teacher answers {len(examples)} training prompts (greedy)")
    bar = "teacher answers" if show_progress else None  # one progress bar, rank 0's
    answers = generate(teacher, tokenizer, [r.prompt for r in rendered], Sampling(max_new_tokens=cfg.eval.max_new_tokens),
                       add_special_tokens=cfg.data.template != "chat", progress=bar)
    swapped = [Example(ex.messages[:-1] + [{"role": "assistant", "content": a.text}], ex.where,
                       {**ex.fields, "output": a.text}, ex.group) for ex, a in zip(examples, answers)]
    return tokenize_split(swapped, cfg.data, tokenizer, data.stats["max_length"], Counter())


class Distill(Objective):
    """The student's objective (`student`), with a teacher: its soft targets as the loss (`distill.mode: logits`), or
    its answers as the training responses (`sequence`). Measuring, samples and results are the student objective's."""

    def __init__(self, student: Objective, dtype: torch.dtype):
        self.student, self.dtype = student, dtype
        self.cfg, self.data, self.tokenizer, self.pad_id = student.cfg, student.data, student.tokenizer, student.pad_id
        self.train, self.val = student.train, student.val
        for name in ("task", "examples_per_pass", "measure_shards", "generates", "checks_forgetting"):
            setattr(self, name, getattr(student, name))
        self.settings = self.cfg.distill
        self.sequence = self.settings.mode == "sequence"
        self._teacher = self.topk = None
        self.teacher_metrics: dict | None = None
        self.teacher_id = ""

    @property
    def teacher(self):
        return self._teacher

    def load(self, ctx: Context, examples_needed: int) -> None:
        d = self.settings
        teacher_dir = resolve_model_dir(d.teacher)
        self.teacher_id = f"{d.teacher}:{model_fingerprint(teacher_dir)}"
        check_tokenizers(self.tokenizer, load_tokenizer(teacher_dir), d.mode)
        teacher = load_model(teacher_dir, self.dtype, ctx.device, self.task, labels=self.data.stats.get("labels")).eval()
        teacher = merge_adapter(teacher)
        teacher.requires_grad_(False)
        ctx.log(f"distillation from {d.teacher} ({sum(p.numel() for p in teacher.parameters()):,} parameters), "
                f"{d.mode} mode, alpha {d.alpha}, T {d.temperature}, {d.kl} KL")
        if self.sequence:
            self.train = teacher_answers(teacher, self.tokenizer, self.data, self.cfg, examples_needed, ctx.log, ctx.main).tokens
        self._teacher = teacher

    def prepare(self, model, ctx: Context) -> None:
        """The teacher on the held-out split (reported next to the student); with `distill.top_k` its one pass over the
        training split (rank 0 writes the cache, the others wait for the files, then map them), after which the
        teacher is freed, as it is in sequence mode, whose answers are all it was needed for."""
        self.student.prepare(model, ctx)
        self.teacher_metrics = ctx.measure(self._teacher)
        if self.teacher_metrics:
            ctx.log("teacher on the held-out split: " + self.describe(self.teacher_metrics))
        if self.settings.top_k:  # rank 0 builds; the others wait for its files (no collective waits that long), then map them
            self.topk = teacher_topk(self._teacher, self.train, self.settings.top_k, ctx.cache_dir, self.pad_id, ctx.device,
                                     ctx.batch_tokens or 4096, ctx.log, build=ctx.main, teacher_id=self.teacher_id)
            ctx.sync()
            self._teacher = None
        elif self.sequence:
            self._teacher = None

    def prepare_measure(self, base) -> None:
        self.student.prepare_measure(base)

    def weight(self, example: Tokenized) -> int:
        return self.student.weight(example)

    def loss(self, model, batch, examples: list[int]) -> torch.Tensor:
        if self.sequence:  # the teacher's answers are the responses
            return self.student.loss(model, batch, examples)
        if self.topk is not None:
            return cached_distill_sum_loss(model, batch, self.topk.rows(examples), self.settings)
        return distill_sum_loss(model, self._teacher, batch, self.settings)

    def measure(self, model, examples: list[Tokenized]) -> dict:
        return self.student.measure(model, examples)

    def samples(self, model, indices: list[int]) -> list:
        return self.student.samples(model, indices)

    def describe(self, metrics: dict) -> str:
        return self.student.describe(metrics)

    def results(self, before: dict, after: dict) -> list[str]:
        return self.student.results(before, after)

    def save(self, folder: Path) -> None:
        self.student.save(folder)
