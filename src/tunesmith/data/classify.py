"""Classification data: text (or a text pair) -> token ids, label name -> class index.

Label names come from the training split, in natural order ("0" < "2" < "10", else alphabetical);
a validation label never seen in training is an error naming the record. Over-long texts are cut at the end
(`data.overlong: truncate`) or at the start (`truncate_left`), keeping the first and last special tokens, or
dropped, and counted either way.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from tunesmith.data.render import IGNORE, Rendered, Tokenized
from tunesmith.data.shapes import Example
from tunesmith.errors import TunesmithError


def label_names(examples: list[Example]) -> list[str]:
    names = {ex.label for ex in examples}
    return sorted(names, key=lambda n: (0, int(n), "") if n.lstrip("-").isdigit() else (1, 0, n))


def tokenize_classification(examples: list[Example], labels: list[str], tokenizer, max_length: int, overlong: str,
                            counts: Counter) -> tuple[list[Example], list[Rendered], list[Tokenized]]:
    index = {n: i for i, n in enumerate(labels)}
    for ex in examples:
        if ex.label not in index:
            raise TunesmithError(f"{ex.where}: label {ex.label!r} does not occur in the training data "
                                 f"(training labels: {', '.join(labels)})")
    if not examples:
        return [], [], []
    texts = [ex.fields["text"] for ex in examples]
    pairs = [ex.fields.get("text_pair") or None for ex in examples]
    kw = {"text_pair": pairs} if any(pairs) else {}
    enc = tokenizer(texts, truncation=False, **kw)["input_ids"]
    kept_ex, kept_r, kept_t = [], [], []
    for ex, ids in zip(examples, enc):
        cut = len(ids) > max_length
        if cut and overlong == "drop":
            counts["dropped_overlong"] += 1
            continue
        if cut:  # keep the first and the final special token (e.g. [CLS], [SEP]): a well-formed input
            ids = (list(ids[: max_length - 1]) + [ids[-1]] if overlong == "truncate"
                   else [ids[0]] + list(ids[len(ids) - max_length + 1:]))
            counts["truncated"] += 1
        arr = np.asarray(ids, dtype=np.int32)
        kept_ex.append(ex)
        kept_r.append(Rendered(ex.fields["text"], [], ex.fields["text"], ex.label))
        kept_t.append(Tokenized(arr, np.full(len(arr), IGNORE, dtype=np.int32), cut, index[ex.label]))
    return kept_ex, kept_r, kept_t
