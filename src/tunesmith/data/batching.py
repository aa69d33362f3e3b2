"""Batches with little padding and bounded memory, in a seeded order that a resume can reproduce.

Each epoch: shuffle, sort by length within windows of 32 steps, cut into optimizer steps of
`examples_per_step` examples, shuffle the steps. Inside a step the examples (similar lengths)
are split into forward passes of at most `micro_batch_size` examples and at most `batch_tokens`
padded tokens (short examples share one pass, long ones get several small passes, so peak
activation memory is bounded by the budget, not by the longest examples; on SmolLM2 passes of
<= 1024 tokens were also faster than bigger ones, see docs/performance.md). Padding is on the right, and tokens after an example's last trained label
are dropped (they cannot change the loss).
"""
from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from tunesmith.data.render import IGNORE, Tokenized

WINDOW = 32


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) right-padded
    labels: torch.Tensor     # (B, T) IGNORE on prompt and padding
    real_tokens: int         # non-padding tokens fed to the model
    label_tokens: int        # trained targets (for loss normalisation): tokens, or examples for classification
    attention_mask: torch.Tensor | None = None  # classification only (encoders attend both ways)
    classes: torch.Tensor | None = None         # classification: (B,) class indices


def epoch_plan(lengths: list[int], examples_per_step: int, seed: int, epoch: int) -> list[list[int]]:
    """The optimizer steps of one epoch, each a list of example indices sorted by length."""
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    steps = []
    window = examples_per_step * WINDOW
    for w in range(0, len(order), window):
        chunk = sorted(order[w:w + window], key=lambda i: lengths[i])
        steps.extend(chunk[j:j + examples_per_step] for j in range(0, len(chunk), examples_per_step))
    rng.shuffle(steps)
    return steps


def step_plan(lengths: list[int], examples_per_step: int, seed: int, repeats: int = 1,
              start: int = 0) -> Iterator[tuple[int, list[int]]]:
    """(epoch, the step's examples) for every optimizer step from step `start` (0-based) on, without end: each epoch's
    steps (`epoch_plan`), each trained `repeats` steps in a row (online RL's several updates on one batch of rollouts).
    A pure function of its arguments, so a resumed run starts at its checkpoint's step and gets the steps the first
    launch would have had, without building a batch."""
    def every_step():
        for epoch in itertools.count():
            for examples in epoch_plan(lengths, examples_per_step, seed, epoch):
                for _ in range(repeats):
                    yield epoch, examples
    return itertools.islice(every_step(), start, None)


def split_passes(step: list[int], lengths: list[int], micro_batch_size: int, batch_tokens: int | None) -> list[list[int]]:
    """Forward passes for one step's (length-sorted) examples: at most `micro_batch_size` examples and at most
    `batch_tokens` padded tokens each (an example longer than the budget gets a pass of its own)."""
    budget = batch_tokens or float("inf")
    passes, current = [], []
    for i in step:
        width = max([lengths[j] for j in current] + [lengths[i]])
        if current and (len(current) == micro_batch_size or width * (len(current) + 1) > budget):
            passes.append(current)
            current = []
        current.append(i)
    passes.append(current)
    return passes


def effective_length(t: Tokenized) -> int:
    if t.label is not None:
        return len(t.input_ids)
    if t.rejected is not None:  # a pair costs both sequences
        return max(_trained_length(t), _trained_length(t.rejected))
    return _trained_length(t)


def _trained_length(t: Tokenized) -> int:
    trained = np.flatnonzero(t.labels != IGNORE)
    return int(trained[-1]) + 1 if len(trained) else len(t.input_ids)


def collate(examples: list[Tokenized], pad_id: int, device=None) -> Batch:
    if examples[0].label is not None:
        return collate_classes(examples, pad_id, device)
    if examples[0].rejected is not None:  # pairs: the chosen rows, then the rejected rows
        return _collate_rows(examples + [t.rejected for t in examples], pad_id, device)
    return _collate_rows(examples, pad_id, device)


def _collate_rows(examples: list[Tokenized], pad_id: int, device=None) -> Batch:
    lengths = [_trained_length(t) for t in examples]
    width = max(lengths)
    ids = np.full((len(examples), width), pad_id, dtype=np.int64)
    labels = np.full((len(examples), width), IGNORE, dtype=np.int64)
    for row, (t, n) in enumerate(zip(examples, lengths)):
        ids[row, :n] = t.input_ids[:n]
        labels[row, :n] = t.labels[:n]
    label_tokens = int((labels[:, 1:] != IGNORE).sum())
    return Batch(torch.from_numpy(ids).to(device), torch.from_numpy(labels).to(device), sum(lengths), label_tokens)


def collate_classes(examples: list[Tokenized], pad_id: int, device=None) -> Batch:
    """Right-padded ids with an attention mask (an encoder would otherwise attend to the padding)."""
    width = max(len(t.input_ids) for t in examples)
    ids = np.full((len(examples), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(examples), width), dtype=np.int64)
    for row, t in enumerate(examples):
        ids[row, :len(t.input_ids)] = t.input_ids
        mask[row, :len(t.input_ids)] = 1
    classes = torch.tensor([t.label for t in examples], dtype=torch.long, device=device)
    return Batch(torch.from_numpy(ids).to(device), classes, int(mask.sum()), len(examples),
                 torch.from_numpy(mask).to(device), classes)
