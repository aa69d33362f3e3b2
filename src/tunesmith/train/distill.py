"""Knowledge distillation: a teacher's soft targets for the student, on the response tokens.

    loss = alpha * CE(labels) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

(`distill.kl: reverse` swaps the KL's arguments.) The teacher runs on the fly in no-grad eval mode
on the same batch; only labelled positions go through the vocabulary head, for student and teacher
alike. Classification distils class logits the same way. `distill.mode: sequence` instead replaces
every training response with the teacher's greedy answer to its prompt (tokenizers may differ).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tunesmith.errors import TunesmithError
from tunesmith.train.loss import label_logits


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


def check_tokenizers(student_tok, teacher_tok, mode: str) -> None:
    if mode == "logits" and student_tok.get_vocab() != teacher_tok.get_vocab():
        raise TunesmithError("distill.mode=logits needs the teacher and student to share a tokenizer (they do not); "
                             "use distill.mode=sequence to train the student on the teacher's generated answers instead")


def teacher_answers(teacher, tokenizer, data, cfg, n: int, log) -> None:
    """`distill.mode: sequence`: the first `n` training responses become the teacher's greedy answers (in place)."""
    from collections import Counter

    from tunesmith.data.prepare import tokenize_split
    from tunesmith.data.shapes import Example
    from tunesmith.evaluate.generate import Sampling, generate

    examples, rendered = data.train.examples[:n], data.train.rendered[:n]
    log(f"distill.mode=sequence: the teacher answers {len(examples)} training prompts (greedy)")
    answers = generate(teacher, tokenizer, [r.prompt for r in rendered], Sampling(max_new_tokens=cfg.eval.max_new_tokens),
                       add_special_tokens=cfg.data.template != "chat")
    swapped = [Example(ex.messages[:-1] + [{"role": "assistant", "content": a.text}], ex.where,
                       {**ex.fields, "output": a.text}, ex.group) for ex, a in zip(examples, answers)]
    split = tokenize_split(swapped, cfg.data, tokenizer, data.stats["max_length"], Counter())
    data.train.examples, data.train.rendered, data.train.tokens = split.examples, split.rendered, split.tokens
