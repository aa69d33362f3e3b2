"""Held-out loss, perplexity and mean token accuracy on the response tokens."""
from __future__ import annotations

import math

import torch

from tunesmith.data.batching import collate
from tunesmith.data.render import Tokenized
from tunesmith.train.loss import sum_loss


@torch.no_grad()
def heldout_metrics(model, examples: list[Tokenized], pad_id: int, batch_size: int = 8) -> dict:
    if not examples:
        return {}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    total, correct, count = 0.0, 0, 0
    for s in range(0, len(order), batch_size):
        batch = collate([examples[i] for i in order[s:s + batch_size]], pad_id, device)
        loss, right = sum_loss(model, batch.input_ids, batch.labels, with_accuracy=True)
        total += float(loss)
        correct += int(right)
        count += batch.label_tokens
    model.train(was_training)
    loss = total / count
    return {"eval_loss": round(loss, 5), "eval_ppl": round(math.exp(min(loss, 50)), 4),
            "eval_token_accuracy": round(correct / count, 5), "eval_label_tokens": count}
