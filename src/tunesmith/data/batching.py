"""Micro-batches with little padding, in a seeded order that a resume can reproduce.

Each epoch: shuffle, then within windows of 32 micro-batches sort by length and cut, then
shuffle the micro-batches. Padding is on the right and tokens after an example's last
trained label are dropped (they cannot change the loss).
"""
from __future__ import annotations

import random
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
    label_tokens: int        # trained targets (for loss normalisation)


def epoch_plan(lengths: list[int], micro_batch: int, seed: int, epoch: int) -> list[list[int]]:
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    step = micro_batch * WINDOW
    for w in range(0, len(order), step):
        window = sorted(order[w:w + step], key=lambda i: lengths[i])
        batches.extend(window[j:j + micro_batch] for j in range(0, len(window), micro_batch))
    rng.shuffle(batches)
    return batches


def effective_length(t: Tokenized) -> int:
    trained = np.flatnonzero(t.labels != IGNORE)
    return int(trained[-1]) + 1 if len(trained) else len(t.input_ids)


def collate(examples: list[Tokenized], pad_id: int, device=None) -> Batch:
    lengths = [effective_length(t) for t in examples]
    width = max(lengths)
    ids = np.full((len(examples), width), pad_id, dtype=np.int64)
    labels = np.full((len(examples), width), IGNORE, dtype=np.int64)
    for row, (t, n) in enumerate(zip(examples, lengths)):
        ids[row, :n] = t.input_ids[:n]
        labels[row, :n] = t.labels[:n]
    label_tokens = int((labels[:, 1:] != IGNORE).sum())
    return Batch(torch.from_numpy(ids).to(device), torch.from_numpy(labels).to(device), sum(lengths), label_tokens)
