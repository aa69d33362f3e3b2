"""Sequence classification: a head for the data's labels on an encoder (or on a decoder's last token), trained on
cross-entropy summed over the examples and normalised by the step's example count (with `train.label_smoothing`, on
smoothed targets). Held-out: loss, accuracy, macro precision/recall/F1; macro-F1 needs every prediction, so each
process scores the whole split.
"""
from __future__ import annotations

import torch
from sklearn.metrics import precision_recall_fscore_support

from tunesmith.data.batching import collate_classes
from tunesmith.data.render import Tokenized
from tunesmith.models.generate import Generation
from tunesmith.models.heads import class_sum_loss
from tunesmith.objectives import Objective


@torch.no_grad()
def predict(model, examples: list[Tokenized], pad_id: int, batch_size: int = 32) -> tuple[list[int], float]:
    """(predicted class per example, summed cross-entropy)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))  # little padding
    preds, total = [0] * len(examples), 0.0
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = collate_classes([examples[i] for i in idx], pad_id, device)
        loss, logits = class_sum_loss(model, batch, return_logits=True)
        total += float(loss)
        for i, p in zip(idx, logits.argmax(-1).tolist()):
            preds[i] = p
    model.train(was_training)
    return preds, total


def classification_metrics(model, examples: list[Tokenized], pad_id: int) -> dict:
    if not examples:
        return {}
    preds, total = predict(model, examples, pad_id)
    return scores(preds, [t.label for t in examples], total)


def scores(preds: list[int], gold: list[int], total_loss: float) -> dict:
    """Loss per example, accuracy and macro precision / recall / F1 of predicted against gold class ids."""
    p, r, f, _ = precision_recall_fscore_support(gold, preds, average="macro", zero_division=0)
    return {"eval_loss": round(total_loss / len(gold), 5), "eval_accuracy": round(sum(a == b for a, b in zip(preds, gold)) / len(gold), 5),
            "eval_precision": round(float(p), 5), "eval_recall": round(float(r), 5), "eval_f1": round(float(f), 5),
            "eval_examples": len(gold)}


def predicted_labels(model, examples: list[Tokenized], pad_id: int, labels: list[str]) -> list[Generation]:
    """Predictions shaped like generations, for the side-by-side table."""
    preds, _ = predict(model, examples, pad_id)
    return [Generation(text=labels[p], new_tokens=0, stopped=True) for p in preds]


class Classification(Objective):
    task = "classification"
    generates = False

    def weight(self, example: Tokenized) -> int:
        return 1

    def loss(self, model, batch, examples: list[int]) -> torch.Tensor:
        return class_sum_loss(model, batch, label_smoothing=self.cfg.train.label_smoothing)

    def measure(self, model, examples: list[Tokenized]) -> dict:
        return classification_metrics(model, examples, self.pad_id)

    def samples(self, model, indices: list[int]) -> list[Generation]:
        return predicted_labels(model, [self.data.val.tokens[i] for i in indices], self.pad_id, self.data.stats["labels"])

    def describe(self, m: dict) -> str:
        return f"accuracy {m['eval_accuracy']:.3f}, macro-F1 {m['eval_f1']:.3f}, loss {m['eval_loss']:.4f}"

    def results(self, before: dict, after: dict) -> list[str]:
        if not (before and after):
            return []
        return [f"held-out: accuracy {before['eval_accuracy']:.3f} -> {after['eval_accuracy']:.3f}, macro-F1 "
                f"{before['eval_f1']:.3f} -> {after['eval_f1']:.3f}, loss {before['eval_loss']:.4f} -> {after['eval_loss']:.4f}"]


OBJECTIVE = Classification
