"""A run's blind A/B judgements read as preference pairs, so that people's choices train the next model (DPO, or a
reward model for RL).

The studio appends one line per judgement to `runs/NAME/judgements.jsonl` (evaluate/human.py lists the fields):
`prompt` (the conversation both models answered, messages ending in the user's turn), `answer_a`, `answer_b` and
`winner` ("a", "b" or "tie"). Each decided judgement becomes one pair: the prompt, the winner's answer as `chosen`,
the loser's as `rejected`. Ties say nothing about which answer is better and are dropped, and so is a judgement
between two identical answers (a pair that teaches nothing). The prompt is the judged conversation; config.py has a
child run render it with the template and system prompt of the run that was judged (`judged_run_prompts`), so the
pairs read as the judged model read them.

The file is an append-only log (several sessions, several people, exported files joined), so a line that is not a
usable judgement (torn by a crash mid-write, a field edited by hand) is dropped with its `file:line` and the reason
instead of stopping the run: `tunesmith data inspect` lists every dropped line, training prints the counts, and the
run records them in its data stats (`JudgedPairs.counts`).
Judgements of the same prompt share a `group`, so a held-out split never holds a prompt that training learned from.
A file someone brings to be merged into a run's judgements (the studio's import) is held to more: `check_judgements_text`
checks every line, field by field, and refuses the whole file with the bad lines named (nothing is merged from it).

A file is read as judgements when it is named `judgements.jsonl` (or `NAME-judgements.jsonl`, the studio's download)
or when its first line has `winner`, `answer_a` and `answer_b`. Written here because the format is tunesmith's own;
data/read.py reads a file through this module, so it imports nothing of data/ (no import cycle).
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.errors import TunesmithError

JUDGEMENT_FIELDS = ("winner", "answer_a", "answer_b")
ROLES = ("system", "user", "assistant")


@dataclass
class JudgedPairs:
    """What a judgements file holds: the pairs (preference records), and every line left out, with where and why."""
    path: str
    judgements: int = 0                                # non-blank lines
    pairs: list[tuple[dict, str]] = field(default_factory=list)  # (fields, file:line); fields: prompt, chosen, rejected, group
    ties: list[str] = field(default_factory=list)      # file:line of each tie
    identical: list[str] = field(default_factory=list)  # file:line of each judgement between two identical answers
    unusable: list[str] = field(default_factory=list)  # "file:line: why" of each line that is not a usable judgement

    def describe(self, first_unusable: bool = True) -> str:
        dropped = [f"{len(self.ties)} tie{'s' * (len(self.ties) != 1)}"]
        if self.identical:
            dropped.append(f"{len(self.identical)} between identical answers")
        if self.unusable:
            dropped.append(f"{len(self.unusable)} unusable line{'s' * (len(self.unusable) != 1)}"
                           + (f" (first: {self.unusable[0]})" if first_unusable else ""))
        return (f"{self.path}: {self.judgements} judgements -> {len(self.pairs)} preference pairs (winner chosen, loser "
                f"rejected); dropped " + ", ".join(dropped))

    def counts(self) -> dict:
        """What a run records of the file in its data stats (summary.json, eval.json: data.prepare.load_examples)."""
        return {"file": self.path, "judgements": self.judgements, "pairs": len(self.pairs), "dropped_ties": len(self.ties),
                "dropped_identical": len(self.identical), "dropped_unusable": len(self.unusable),
                "unusable_samples": self.unusable[:3]}


def is_judgements_file(path) -> bool:
    """Named as the studio names a judgements file, or a JSON-lines file whose first record is a judgement."""
    p = Path(path)
    if p.suffix.lower() not in (".jsonl", ".ndjson") or not p.is_file():
        return False
    if p.name == "judgements.jsonl" or p.name.endswith("-judgements.jsonl"):
        return True
    with open(p, encoding="utf-8-sig", errors="replace") as fh:
        first = next((line for line in fh if line.strip()), "")
    try:
        obj = json.loads(first)
    except ValueError:
        return False
    return isinstance(obj, dict) and all(k in obj for k in JUDGEMENT_FIELDS)


def read_judgements(path) -> JudgedPairs:
    p = Path(path)
    got = JudgedPairs(str(p))
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise TunesmithError(f"{p}:{line}: not UTF-8 text") from None
    for n, line in enumerate(text.split("\n"), 1):  # "\n" only, as data/read.py reads JSON lines
        if not line.strip():
            continue
        got.judgements += 1
        where = f"{p}:{n}"
        try:
            pair = _pair(line, where)
        except TunesmithError as e:
            got.unusable.append(str(e))
            continue
        if pair == "tie":
            got.ties.append(where)
        elif pair == "identical":
            got.identical.append(where)
        else:
            got.pairs.append((pair, where))
    return got


def pair_records(path) -> list[tuple[dict, str]]:
    """The preference records of a judgements file as (fields, file:line) (data/read.py reads a judgements file with
    this); what was dropped is printed on stderr, and a file with no decided pair is an error that says what it held."""
    got = read_judgements(path)
    if not got.pairs:
        raise TunesmithError(f"no preference pairs to learn from: {got.describe()}" if got.judgements
                             else f"{path}: no judgements (the file is empty)")
    if got.ties or got.identical or got.unusable:
        print(f"tunesmith: {got.describe()}", file=sys.stderr)
    return got.pairs


def _pair(line: str, where: str):
    """One judgement line -> the preference record's fields, "tie", or "identical"; TunesmithError when unusable."""
    try:
        obj = json.loads(line, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise TunesmithError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    except ValueError as e:  # NaN, an integer of thousands of digits
        raise TunesmithError(f"{where}: not usable JSON ({str(e).split(';')[0]})") from None
    except RecursionError:
        raise TunesmithError(f"{where}: not usable JSON (nesting too deep)") from None
    if not isinstance(obj, dict):
        raise TunesmithError(f"{where}: expected a JSON object (a judgement), got {type(obj).__name__}")
    winner = obj.get("winner")
    if winner not in ("a", "b", "tie"):
        raise TunesmithError(f"{where}: 'winner' is {winner!r}; expected \"a\", \"b\" or \"tie\"")
    if winner == "tie":
        return "tie"
    for key in ("answer_a", "answer_b"):
        if not isinstance(obj.get(key), str):
            raise TunesmithError(f"{where}: {key!r} is {'missing' if key not in obj else type(obj[key]).__name__}; "
                                 f"expected the answer's text")
    prompt = obj.get("prompt")
    if isinstance(prompt, str):  # a judgement written by hand: the user's message alone
        prompt = [{"role": "user", "content": prompt}]
    if prompt is None:
        raise TunesmithError(f"{where}: no 'prompt' (the conversation both answers reply to)")
    messages = _messages(prompt, where)
    if messages[-1]["role"] != "user":
        raise TunesmithError(f"{where}: 'prompt' ends with the {messages[-1]['role']}'s turn; the judged conversation "
                             f"ends with the user's turn")
    chosen, rejected = (obj["answer_a"], obj["answer_b"]) if winner == "a" else (obj["answer_b"], obj["answer_a"])
    if chosen == rejected:
        return "identical"
    group = "prompt-" + hashlib.sha1(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]
    return {"prompt": messages, "chosen": chosen, "rejected": rejected, "group": group}


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def _messages(prompt, where: str) -> list[dict]:
    """The judged conversation: a non-empty list of {role, content} turns (data/shapes.py checks chat data the same way)."""
    if not isinstance(prompt, list) or not prompt:
        raise TunesmithError(f"{where}: 'prompt' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise TunesmithError(f"{where}: 'prompt'[{i}] is {json.dumps(m)[:80]}; expected {{role: system/user/assistant, "
                                 f"content: text}}")
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def check_judgements_text(text: str, name: str, most: int = 10_000) -> list[dict]:
    """The judgements of a file someone brings (another person's or session's export), every line checked before any
    is kept: a JSON object with `a` and `b` (the two models' names), `winner` ("a", "b" or "tie"), `answer_a`,
    `answer_b` (text) and `prompt` (the conversation, ending with the user's turn). Raises TunesmithError listing the
    first bad lines as `name:line: field: what was expected` (an import is all or nothing), or when the file holds no
    judgement or more than `most`."""
    rows, problems = [], []
    lines = text.split("\n")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if len(rows) + len(problems) >= most:
            raise TunesmithError(f"{name}: more than {most} judgements; import at most {most} at a time")
        try:
            rows.append(_judgement(line, f"{name}:{n}"))
        except TunesmithError as e:
            problems.append(str(e))
    if problems:
        more = f" (and {len(problems) - 5} more bad lines)" if len(problems) > 5 else ""
        raise TunesmithError(f"{len(problems)} of {len(rows) + len(problems)} lines are not judgements; nothing was "
                             f"imported:\n" + "\n".join(problems[:5]) + more)
    if not rows:
        raise TunesmithError(f"{name}: no judgements (the file is empty)")
    return rows


def _judgement(line: str, where: str) -> dict:
    """One line of a judgements file, checked field by field (the line as it was, its prompt as messages)."""
    try:
        obj = json.loads(line, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise TunesmithError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    except (ValueError, RecursionError) as e:
        raise TunesmithError(f"{where}: not usable JSON ({str(e).split(';')[0] or 'nesting too deep'})") from None
    if not isinstance(obj, dict):
        raise TunesmithError(f"{where}: expected a JSON object (a judgement), got {type(obj).__name__}")
    if obj.get("winner") not in ("a", "b", "tie"):
        raise TunesmithError(f"{where}: winner: expected \"a\", \"b\" or \"tie\", got {json.dumps(obj.get('winner'))[:40]}")
    for key, what in (("a", "the first model's name"), ("b", "the second model's name"), ("answer_a", "the first "
                      "model's answer"), ("answer_b", "the second model's answer")):
        value = obj.get(key)
        if not isinstance(value, str) or (key in ("a", "b") and not value.strip()):
            got = "missing" if key not in obj else f"{type(value).__name__} {json.dumps(value)[:40]}"
            raise TunesmithError(f"{where}: {key}: expected text ({what}), got {got}")
    if obj.get("shown_first", "a") not in ("a", "b"):
        raise TunesmithError(f"{where}: shown_first: expected \"a\" or \"b\"")
    prompt = obj.get("prompt")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if prompt is None:
        raise TunesmithError(f"{where}: prompt: missing (the conversation both answers reply to)")
    messages = _messages(prompt, where)
    if messages[-1]["role"] != "user":
        raise TunesmithError(f"{where}: prompt: ends with the {messages[-1]['role']}'s turn; expected the user's turn")
    return {**obj, "prompt": messages}
