"""Supervised fine-tuning: cross-entropy on the response tokens, normalised by the trained tokens of the whole step
(with `train.label_smoothing`, on smoothed targets; held-out losses stay plain cross-entropy). The loss head runs the
vocabulary projection only where labels are (models/heads.py). Held-out: loss, perplexity and mean token accuracy on
the response tokens, summed over shares of the split when several processes measure it.
"""
from __future__ import annotations

import math

import torch

from tunesmith.data.batching import collate
from tunesmith.data.render import Tokenized
from tunesmith.models.heads import sum_loss
from tunesmith.objectives import Objective


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


class SFT(Objective):
    task = "causal"
    measure_shards = True
    checks_forgetting = True

    def loss(self, model, batch, examples: list[int]) -> torch.Tensor:
        return sum_loss(model, batch.input_ids, batch.labels, label_smoothing=self.cfg.train.label_smoothing)

    def measure(self, model, examples: list[Tokenized]) -> dict:
        return heldout_metrics(model, examples, self.pad_id)

    def describe(self, m: dict) -> str:
        return (f"held-out loss {m.get('eval_loss', float('nan')):.4f}, "
                f"token accuracy {m.get('eval_token_accuracy', float('nan')):.3f}")

    def results(self, before: dict, after: dict) -> list[str]:
        if not (before and after):
            return []
        return [f"held-out loss on responses: {before['eval_loss']:.4f} -> {after['eval_loss']:.4f} "
                f"(perplexity {before['eval_ppl']:.2f} -> {after['eval_ppl']:.2f}); "
                f"token accuracy {before['eval_token_accuracy']:.3f} -> {after['eval_token_accuracy']:.3f}"]


OBJECTIVE = SFT
