"""Side-by-side table of held-out examples: input, reference, base output, tuned output, with ROUGE-L."""
from __future__ import annotations

import textwrap

from rouge_score import rouge_scorer

_scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    return 100.0 * _scorer.score(reference, prediction)["rougeL"].fmeasure


def build_rows(inputs: list[str], references: list[str], outputs: dict[str, list],
               all_references: list[list[str]] | None = None) -> list[dict]:
    """outputs: column name -> list of Generation (e.g. {"base": [...], "tuned": [...]}); with
    `all_references`, each output is scored against its best reference."""
    rows = []
    for i, (inp, ref) in enumerate(zip(inputs, references)):
        row = {"input": inp, "reference": ref}
        refs = all_references[i] if all_references else [ref]
        for name, gens in outputs.items():
            row[name] = gens[i].text
            row[f"{name}_rougeL"] = round(max(rouge_l(gens[i].text, r) for r in refs), 1)
            row[f"{name}_stopped"] = gens[i].stopped
        rows.append(row)
    return rows


def mean_score(rows: list[dict], name: str) -> float:
    return round(sum(r[f"{name}_rougeL"] for r in rows) / max(1, len(rows)), 1)


def rouge_applies(rows: list[dict], generated: bool) -> bool:
    """Whether the rows' ROUGE-L means anything: generated text with a reference (not a classifier's labels, a reward
    model's scores, or answers to prompts alone)."""
    return generated and any(r["reference"] for r in rows)


def format_table(rows: list[dict], names: list[str], width: int = 100, generated: bool = True) -> str:
    """The rows as text; `generated=False` (a classifier's labels, a reward model's scores) leaves out ROUGE-L."""
    lines = []
    for i, r in enumerate(rows, 1):
        lines.append(f"--- example {i} " + "-" * max(0, width - 14))
        lines.append(_field("input", _shorten(r["input"], 300), width))
        lines.append(_field("reference", r["reference"], width))
        for n in names:
            tag = "" if r[f"{n}_stopped"] else " [hit length cap]"
            label = f"{n} (R-L {r[f'{n}_rougeL']:.0f})" if generated else n
            lines.append(_field(label, r[n] + tag, width))
    lines.append("-" * width)
    if generated:
        lines.append("mean ROUGE-L vs reference: " + ", ".join(f"{n} {mean_score(rows, n):.1f}" for n in names))
    return "\n".join(lines)


def _shorten(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _field(label: str, text: str, width: int) -> str:
    head = f"{label:>16}: "
    body = textwrap.wrap(" ".join(text.split()) or "(empty)", width - len(head)) or [""]
    return "\n".join([head + body[0]] + [" " * len(head) + b for b in body[1:]])
