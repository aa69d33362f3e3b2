"""From `data:` config to tokenized train/validation splits, with every count reported.

read -> map columns -> detect/validate shape -> dedup -> split -> render -> tokenize -> drop/truncate.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import replace

import numpy as np

from tunesmith.catalog import SFT_FORMATS
from tunesmith.config import DataConfig
from tunesmith.data import cache as data_cache
from tunesmith.data.classify import label_names, tokenize_classification
from tunesmith.data.judgements import is_judgements_file, read_judgements
from tunesmith.data.read import expand_paths, read_records
from tunesmith.data.render import ENCODE_CHUNK, IGNORE, PreparedData, Split, Tokenized, cut_start, encode_texts, render, tokenize
from tunesmith.data.shapes import Example, detect_format, map_columns, to_example
from tunesmith.errors import TunesmithError


def load_examples(cfg: DataConfig, path) -> tuple[str, list[Example], dict]:
    """Read and validate records; returns (format, examples, counts)."""
    records = read_records(path)
    fmt = cfg.format
    if fmt == "auto":
        fmt = detect_format(map_columns(records[0], cfg.columns), records[0].where, cfg.columns)
    examples, bad = [], []
    for rec in records:
        try:
            examples.append(to_example(map_columns(rec, cfg.columns), fmt, rec.where))
        except TunesmithError as e:
            if cfg.on_bad_record == "fail":
                hint = "" if cfg.format != "auto" else f" (format {fmt} detected from {records[0].where})"
                raise TunesmithError(f"{e}{hint}") from None
            bad.append(str(e))
    if not examples:
        raise TunesmithError(f"no usable records in {path}: {len(bad)} bad, e.g. {bad[0] if bad else '-'}")
    counts = {"records": len(records), "bad_skipped": len(bad), "bad_samples": bad[:3]}
    judged = [read_judgements(p).counts() for p in expand_paths(path) if is_judgements_file(p)]
    if judged:  # what each judgements file dropped (ties, identical answers, unusable lines); `records` counts its pairs
        counts["judgements"] = judged
    if cfg.dedup:
        seen, kept = set(), []
        for ex in examples:
            key = json.dumps([ex.messages, ex.label, ex.chosen, ex.rejected], sort_keys=True)
            if key not in seen:
                seen.add(key)
                kept.append(ex)
        counts["duplicates_removed"] = len(examples) - len(kept)
        examples = kept
    return fmt, examples, counts


def check_file(path, shown: str) -> tuple[str, int]:
    """Read and validate every record of one data file as training would (the studio checks an upload with this);
    returns (format, records). Errors name the file as `shown` (what the user called it), never `path`."""
    try:
        fmt, examples, _ = load_examples(DataConfig(path=str(path)), str(path))
    except TunesmithError as e:
        raise TunesmithError(str(e).replace(str(path), shown)) from None
    _check_supported(fmt, f"{shown}: ")
    return fmt, len(examples)


def split_examples(examples: list[Example], val_size: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Deterministic split; records sharing a `group` (e.g. a module) land on the same side."""
    n_val = int(round(val_size * len(examples))) if val_size < 1 else int(val_size)
    if n_val <= 0:
        return examples, []
    if n_val >= len(examples):
        raise TunesmithError(f"data.val_size={val_size} leaves no training records out of {len(examples)}")
    groups: dict[str, list[Example]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(ex.group if ex.group is not None else f"#{i}", []).append(ex)
    # order groups by a seeded hash of their name: stable when records are added elsewhere
    order = sorted(groups, key=lambda g: hashlib.sha1(f"{seed}:{g}".encode()).hexdigest())
    val: list[Example] = []
    val_groups = set()
    for g in order:
        if len(val) >= n_val:
            break
        val.extend(groups[g])
        val_groups.add(g)
    train = [ex for g in groups if g not in val_groups for ex in groups[g]]
    return train, val


def tokenize_split(examples: list[Example], cfg: DataConfig, tokenizer, max_length: int, counts: Counter,
                    keep_all: bool = False) -> Split:
    rendered = [render(ex, cfg.template, tokenizer, cfg.train_on_prompt, cfg.system_prompt) for ex in examples]
    toks = tokenize(rendered, tokenizer, cfg.template, max_length, cfg.overlong, drops=counts)
    if keep_all:  # positions line up with `examples`; None where dropped
        return Split(examples, rendered, toks)
    keep = [i for i, t in enumerate(toks) if t is not None]
    counts["truncated"] += sum(toks[i].truncated for i in keep)
    return Split([examples[i] for i in keep], [rendered[i] for i in keep], [toks[i] for i in keep])


def tokenize_pairs(examples: list[Example], cfg: DataConfig, tokenizer, max_length: int, counts: Counter) -> Split:
    """Each pair as two conversations (prompt + chosen, prompt + rejected), trained on the response only;
    a pair is kept when both sides fit (or are truncated with a response token left). With `truncate_left` both
    sides lose the same number of leading tokens, so the two answers are read after the same context (and share
    its computation)."""
    def as_sft(ex: Example, response: str) -> Example:  # a text template renders it as a record with no input
        return Example(ex.messages + [{"role": "assistant", "content": response}], ex.where, _answered_fields(ex, response))

    left = cfg.overlong == "truncate_left"
    side_cfg = cfg.model_copy(update={"overlong": "drop"}) if left else cfg
    side_length = 1 << 30 if left else max_length  # cut below, once the two sides' lengths are known
    chosen = tokenize_split([as_sft(ex, ex.chosen) for ex in examples], side_cfg, tokenizer, side_length, Counter(), keep_all=True)
    rejected = tokenize_split([as_sft(ex, ex.rejected) for ex in examples], side_cfg, tokenizer, side_length, Counter(), keep_all=True)
    kept = Split([], [], [])
    for ex, r, c, j in zip(examples, chosen.rendered, chosen.tokens, rejected.tokens):
        if left and c is not None and j is not None:
            n = max(len(c.input_ids), len(j.input_ids)) - max_length
            c, j = cut_start(c, n), cut_start(j, n)
        if c is None or j is None:
            counts["dropped_overlong"] += 1
            continue
        counts["truncated"] += int(c.truncated or j.truncated)
        c.rejected = j
        kept.examples.append(ex)
        kept.rendered.append(r)
        kept.tokens.append(c)
    return kept


def tokenize_prompts(examples: list[Example], cfg: DataConfig, tokenizer, max_length: int, counts: Counter) -> Split:
    """Prompts alone (online RL): each example's prompt as generation starts from it (rendered as training renders it),
    no token trained (labels all IGNORE); the response, if the record has one, is `rendered[i].reference`. A prompt
    longer than max_length is dropped: cutting it would cut the chat template's turn markers."""
    kept = Split([], [], [])
    examples = [with_answer_turn(ex) for ex in examples]
    rendered = [render(ex, cfg.template, tokenizer, False, cfg.system_prompt) for ex in examples]
    add_special = cfg.template != "chat"
    for start in range(0, len(rendered), ENCODE_CHUNK):
        chunk = rendered[start: start + ENCODE_CHUNK]
        for i, (r, (ids, _)) in enumerate(zip(chunk, encode_texts(tokenizer, [r.prompt for r in chunk], add_special)), start):
            if not len(ids) or len(ids) > max_length:
                counts["dropped_overlong"] += 1
                continue
            kept.examples.append(examples[i])
            kept.rendered.append(r)
            kept.tokens.append(Tokenized(ids, np.full(len(ids), IGNORE, dtype=np.int32)))
    return kept


def with_answer_turn(ex: Example) -> Example:
    """A preference pair's prompt with its chosen answer as the reference turn (prompts of a pair file for RL: in
    training, and in `tunesmith eval` of an RL run on a pair file)."""
    if any(m["role"] == "assistant" for m in ex.messages):
        return ex
    answer = ex.chosen or ""
    return replace(ex, messages=ex.messages + [{"role": "assistant", "content": answer}],
                   fields={**_answered_fields(ex, answer), **ex.fields})


def _answered_fields(ex: Example, answer: str) -> dict:
    """A text template's fields for a prompt and `answer`: those of a single-turn record with no input (an instruction
    record, a prompt/completion record or a one-turn chat; data/shapes.py), so a pair renders as supervised data does."""
    user = _first_user(ex)
    return {"instruction": user, "input": "", "output": answer, "prompt": user, "completion": answer}


def _first_user(ex: Example) -> str:
    return next((m["content"] for m in ex.messages if m["role"] == "user"), "")


def prepare(cfg: DataConfig, tokenizer, model_max_length: int | None = None, for_inspection: bool = False,
            prompts_only: bool = False) -> PreparedData:
    """Tokenized splits. The training split keeps only its tokens (memory stays near the token
    arrays) unless `for_inspection`, which also keeps its examples and rendered text and skips
    the tokenized-data cache. `stats["fingerprint"]` identifies the data (files, settings, tokenizer;
    None for hub datasets): the cache key, and what a resumed run checks."""
    max_length = min(cfg.max_length, model_max_length or cfg.max_length)
    key = data_cache.cache_key(cfg, tokenizer, max_length)
    use_cache = key and cfg.cache and not for_inspection and not prompts_only
    if use_cache and (cached := data_cache.load(key)) is not None:
        return cached
    data = _prepare(cfg, tokenizer, max_length, keep_train_text=for_inspection, prompts_only=prompts_only)
    data.stats["fingerprint"] = key
    if use_cache:
        data_cache.save(key, data)
    return data


def _check_supported(fmt: str, where: str = "") -> None:
    if fmt not in SFT_FORMATS + ("classification", "preference", "prompt"):
        raise TunesmithError(f"{where}data in {fmt} format is not supported; supported: {', '.join(SFT_FORMATS)}, "
                             f"classification, preference, prompt")


def _held_out(cfg: DataConfig, fmt: str, examples: list[Example]) -> tuple[list[Example], list[Example]]:
    """(train, validation): data.val_path's records, or `val_size` split off the training records."""
    if not cfg.val_path:
        return split_examples(examples, cfg.val_size, cfg.seed)
    vfmt, val_ex, _ = load_examples(cfg, cfg.val_path)
    if vfmt != fmt:
        raise TunesmithError(f"data.val_path is in {vfmt} format but data.path is in {fmt} format")
    return examples, val_ex


def _prepare(cfg: DataConfig, tokenizer, max_length: int, keep_train_text: bool, prompts_only: bool = False) -> PreparedData:
    fmt, examples, counts = load_examples(cfg, cfg.path)
    _check_supported(fmt)
    train_ex, val_ex = _held_out(cfg, fmt, examples)
    random.Random(cfg.seed).shuffle(train_ex)
    if cfg.max_examples:
        train_ex = train_ex[: cfg.max_examples]
    train_counts, val_counts = Counter(), Counter()
    if fmt == "classification":
        labels = label_names(train_ex)
        counts["labels"] = labels
        train = Split(*tokenize_classification(train_ex, labels, tokenizer, max_length, cfg.overlong, train_counts))
        val = Split(*tokenize_classification(val_ex, labels, tokenizer, max_length, cfg.overlong, val_counts))
        counts["label_counts"] = {"train": _label_counts(train, labels), "val": _label_counts(val, labels)}
    elif prompts_only or fmt == "prompt":
        train = tokenize_prompts(train_ex, cfg, tokenizer, max_length, train_counts)
        val = tokenize_prompts(val_ex, cfg, tokenizer, max_length, val_counts)
    elif fmt == "preference":
        train = tokenize_pairs(train_ex, cfg, tokenizer, max_length, train_counts)
        val = tokenize_pairs(val_ex, cfg, tokenizer, max_length, val_counts)
    else:
        train = tokenize_split(train_ex, cfg, tokenizer, max_length, train_counts)
        val = tokenize_split(val_ex, cfg, tokenizer, max_length, val_counts)
    if not keep_train_text:
        train = Split([], [], train.tokens)
    if not train.tokens:
        raise TunesmithError(
            f"no training example has a token to learn from: {train_counts['dropped_overlong']} longer than max_length={max_length}, "
            f"{train_counts['dropped_no_labels']} with the response masked or truncated away; raise data.max_length or set data.overlong=truncate")
    stats = {"format": fmt, **counts, "max_length": max_length,
             "train": _split_stats(train, train_counts), "val": _split_stats(val, val_counts)}
    return PreparedData(fmt, train, val, stats)


def _label_counts(split: Split, labels: list[str]) -> dict:
    c = Counter(t.label for t in split.tokens)
    return {name: c[i] for i, name in enumerate(labels)}


def _split_stats(split: Split, counts: Counter) -> dict:
    lengths = np.array([len(t.input_ids) + (len(t.rejected.input_ids) if t.rejected is not None else 0)
                        for t in split.tokens]) if split.tokens else np.zeros(1, dtype=int)  # a pair: both sequences
    label_tokens = int(sum(1 if t.label is not None else int((t.labels != -100).sum()) for t in split.tokens))
    if split.tokens and split.tokens[0].rejected is not None:  # pairs: count both sides
        label_tokens += int(sum(int((t.rejected.labels != -100).sum()) for t in split.tokens))
    return {"kept": len(split.tokens), "dropped_overlong": counts["dropped_overlong"],
            "dropped_no_labels": counts["dropped_no_labels"], "truncated": counts["truncated"],
            "tokens": int(lengths.sum()) if split.tokens else 0, "label_tokens": label_tokens,
            "label_share": round(label_tokens / max(1, int(lengths.sum())), 4),
            "length_min": int(lengths.min()), "length_median": int(np.median(lengths)),
            "length_p95": int(np.percentile(lengths, 95)), "length_max": int(lengths.max())}


def heldout_prompts(cfg: DataConfig, n: int) -> list[dict]:
    """Up to `n` records of the run's held-out split (the same split training made), each as the conversation before
    its answer and the reference answer: {"messages": [...], "reference": str}. For blind comparisons of two models."""
    fmt, examples, _ = load_examples(cfg, cfg.path)
    _, val = _held_out(cfg, fmt, examples)
    out = []
    for ex in val:
        if ex.chosen is not None:
            out.append({"messages": ex.messages, "reference": ex.chosen})
        elif any(m["role"] == "assistant" for m in ex.messages):
            last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
            out.append({"messages": ex.messages[:last], "reference": ex.messages[last]["content"]})
        if len(out) == n:
            break
    return out
