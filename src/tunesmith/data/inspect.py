"""`tunesmith data inspect`: show exactly what training will see.

Detected format and field mapping, counts (records, kept, dropped, truncated per split), token
lengths, the trained share, label distribution for classification, and the first N rendered
examples with the masked prompt and the trained response told apart: colours on a terminal,
`[train]...[/train]` markers otherwise. Preference pairs show their prompt as the model reads it; a judgements file
also lists every judgement it dropped (ties, identical answers, unusable lines with `file:line`).
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from tunesmith.catalog import SFT_FORMATS
from tunesmith.config import Config
from tunesmith.data.judgements import is_judgements_file, read_judgements
from tunesmith.data.prepare import load_examples, prepare
from tunesmith.data.read import expand_paths
from tunesmith.data.render import IGNORE, render
from tunesmith.data.shapes import Example

DIM, GREEN, BOLD, RESET = "\033[2m", "\033[32m", "\033[1m", "\033[0m"


def inspect_data(cfg: Config, tokenizer, n: int = 3, color: bool = False, max_chars: int = 1500) -> str:
    dc = cfg.data
    fmt, examples, counts = load_examples(dc, dc.path)
    out = [f"data: {dc.path}", f"format: {fmt}{' (detected)' if dc.format == 'auto' else ''}"
           + (f"; column mapping: {dc.columns}" if dc.columns else ""),
           f"records: {counts['records']}" + (f", bad skipped: {counts['bad_skipped']} (e.g. {counts['bad_samples'][0]})" if counts["bad_skipped"] else "")
           + (f", duplicates removed: {counts['duplicates_removed']}" if counts.get("duplicates_removed") else "")]
    if fmt in SFT_FORMATS:
        out += _sft(cfg, tokenizer, n, color, max_chars)
    elif fmt == "classification":
        out += _classification(examples, tokenizer, n)
    else:
        for path in (p for p in expand_paths(dc.path) if is_judgements_file(p)):
            out += _judgements(path, dc)
        out += _preference(examples, tokenizer, n, max_chars, dc)
    return "\n".join(out)


def _judgements(path: str, dc, most: int = 20) -> list[str]:
    """What a judgements file held: its pairs, and each judgement left out with where and why."""
    got = read_judgements(path)

    def listed(items: list[str]) -> str:
        return ", ".join(items[:most]) + (f" and {len(items) - most} more" if len(items) > most else "")

    out = [f"judgements: {got.describe(first_unusable=False)}"]
    if got.ties:
        out.append(f"  ties (dropped): {listed(got.ties)}")
    if got.identical:
        out.append(f"  identical answers (dropped): {listed(got.identical)}")
    out += [f"  unusable (dropped): {line}" for line in got.unusable[:most]]
    if len(got.unusable) > most:
        out.append(f"  ... and {len(got.unusable) - most} more unusable lines")
    out.append(f"  prompts rendered with data.template={dc.template!r}, data.system_prompt={dc.system_prompt!r}")
    return out


def _sft(cfg: Config, tokenizer, n: int, color: bool, max_chars: int) -> list[str]:
    data = prepare(cfg.data, tokenizer, for_inspection=True)
    st = data.stats
    out = [f"template: {cfg.data.template}; loss on: {'all tokens' if cfg.data.train_on_prompt else 'responses only'}; "
           f"max_length {st['max_length']} (over-long: {cfg.data.overlong})"]
    for split in ("train", "val"):
        s = st[split]
        out.append(f"{split:>5}: kept {s['kept']}, dropped over-long {s['dropped_overlong']}, dropped with no trained token "
                   f"{s['dropped_no_labels']}, truncated {s['truncated']} | tokens {s['tokens']:,}, trained {s['label_tokens']:,} "
                   f"({100 * s['label_share']:.1f}%) | length min/median/p95/max {s['length_min']}/{s['length_median']}/"
                   f"{s['length_p95']}/{s['length_max']}")
    legend = f"{DIM}masked prompt{RESET} {GREEN}{BOLD}trained{RESET}" if color else "[train]...[/train] = trained tokens; the rest is masked"
    out.append(f"\nfirst {min(n, len(data.train.tokens))} training examples as the model sees them ({legend}):")
    for ex, tok in zip(data.train.examples[:n], data.train.tokens[:n]):
        out.append(f"--- {ex.where} ({len(tok.input_ids)} tokens, {int((tok.labels != IGNORE).sum())} trained)")
        out.append(_show_mask(tok, tokenizer, color, max_chars))
    return out


def _show_mask(tok, tokenizer, color: bool, max_chars: int) -> str:
    trained = tok.labels != IGNORE
    parts, start = [], 0
    for i in range(1, len(trained) + 1):
        if i == len(trained) or trained[i] != trained[start]:
            text = tokenizer.decode(tok.input_ids[start:i].tolist())
            if trained[start]:
                parts.append(f"{GREEN}{BOLD}{text}{RESET}" if color else f"[train]{text}[/train]")
            else:
                if len(text) > max_chars:
                    text = text[: max_chars // 2] + f" ...[{len(text) - max_chars} chars]... " + text[-max_chars // 2:]
                parts.append(f"{DIM}{text}{RESET}" if color else text)
            start = i
    return "".join(parts)


def _lengths(texts: list[str], tokenizer) -> str:
    lens = np.array([len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]])
    return (f"tokens per text min/median/p95/max {lens.min()}/{int(np.median(lens))}/{int(np.percentile(lens, 95))}/{lens.max()}, "
            f"total {lens.sum():,}")


def _classification(examples, tokenizer, n: int) -> list[str]:
    labels = Counter(ex.label for ex in examples)
    out = [f"labels ({len(labels)}): " + ", ".join(f"{k} {v} ({100 * v / len(examples):.1f}%)" for k, v in labels.most_common()),
           _lengths([ex.fields["text"] for ex in examples], tokenizer), f"\nfirst {min(n, len(examples))} examples:"]
    out += [f"--- {ex.where}: [{ex.label}] {ex.fields['text']}" for ex in examples[:n]]
    return out


def _preference(examples, tokenizer, n: int, max_chars: int, dc) -> list[str]:
    out = [f"pairs: {len(examples)}; prompt " + _lengths([" ".join(m["content"] for m in ex.messages) for ex in examples], tokenizer),
           "chosen " + _lengths([ex.chosen for ex in examples], tokenizer),
           "rejected " + _lengths([ex.rejected for ex in examples], tokenizer), f"\nfirst {min(n, len(examples))} pairs:"]
    for ex in examples[:n]:
        prompt = " | ".join(f"{m['role']}: {m['content']}" for m in ex.messages)
        read = render(Example(ex.messages + [{"role": "assistant", "content": ex.chosen}], ex.where), dc.template, tokenizer,
                      system_prompt=dc.system_prompt).prompt if dc.template == "chat" else None
        out += [f"--- {ex.where}", f"  prompt:   {prompt[:max_chars]}"]
        out += [f"  as read:  {read[:max_chars]!r}"] if read is not None else []
        out += [f"  chosen:   {ex.chosen[:max_chars]}", f"  rejected: {ex.rejected[:max_chars]}"]
    return out
