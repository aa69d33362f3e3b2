"""A run's lineage -- base -> v1 -> v2 ... -- with each generation's win rate over its parent from people's blind A/B
judgements, for the studio's run page (and anything else that wants the loop's history).

Each run records where it came from in its config.yaml: the run it continued (`model.name`) and the judgements it
learned from (`data.path`); run/layout.py's `trained_from` reads them back. The chain is followed up to the first
`model.name` that is not a run folder: the base model. A generation's record against its parent comes from the
judgements of the two (in the child's judgements.jsonl or the parent's, whichever holds them): the verdicts where one
side names the parent and the other the child, counted from the child's side (a verdict with the child as `a` is
turned around). Wins, losses and ties; the win rate over decided pairs with a 95 % Wilson interval and the exact
two-sided sign test p-value (evaluate/human.py). A model in a judgement names a run by its folder name, by a path to
it, or by one of the `aliases` the caller knows (the studio's fine_tuned_model ids, and its model ids of a base
model given by its path).

`unjudged_prompts` gives held-out prompts that none of the given judgements used: what a new set of pairs (child vs
parent) should be judged on, so no verdict is about a prompt the child learned from.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tunesmith.config import DataConfig, read_yaml
from tunesmith.evaluate.human import sign_test, wilson
from tunesmith.run.files import read_jsonl
from tunesmith.run.layout import RunDir, trained_from


@dataclass
class WinRate:
    """A generation's verdicts against its parent, counted from the generation's side."""
    wins: int
    losses: int
    ties: int
    win_rate: Optional[float]        # wins / (wins + losses); None when nothing was decided
    ci95: tuple[Optional[float], Optional[float]]
    p_sign_test: float


@dataclass
class Generation:
    name: str                        # the run's folder name, or the base model's name
    run: Optional[Path]              # None for the base model
    parent: Optional[str]            # the parent generation's name; None for the base
    judgements: Optional[Path]       # the judgements file this run learned from (None: it learned from other data)
    vs_parent: Optional[WinRate]     # None for the base, or when no judgement compares this run with its parent


def lineage(run, aliases: Optional[dict[str, Path]] = None, most: int = 100) -> list[Generation]:
    """The generations from the base model to `run`, oldest first. A chain longer than `most` (or a loop of runs that
    name each other) stops there."""
    aliases = {name: Path(p).resolve() for name, p in (aliases or {}).items()}
    chain: list[RunDir] = [RunDir(run)]
    while len(chain) < most:
        parent = trained_from(chain[-1]).parent
        if parent is None or any(parent.path.resolve() == r.path.resolve() for r in chain):
            break
        chain.append(parent)
    chain.reverse()
    base = _base_name(chain[0])
    out = [Generation(base, None, None, None, None)] if base else []
    for i, run_dir in enumerate(chain):
        parent = chain[i - 1] if i else None
        out.append(Generation(run_dir.name, run_dir.path, parent.name if parent else base,
                              trained_from(run_dir).judgements, _vs_parent(run_dir, parent, base, aliases)))
    return out


def unjudged_prompts(data: DataConfig, judged: list[Path], n: int) -> list[dict]:
    """Up to `n` held-out prompts of `data` (data.prepare.heldout_prompts: {"messages", "reference"}) that no judgement
    in the `judged` files was about."""
    from tunesmith.data.prepare import heldout_prompts

    used = set()
    for path in judged:
        if Path(path).is_file():
            for row in read_jsonl(Path(path)):
                if isinstance(row, dict) and row.get("prompt") is not None:
                    used.add(_key(row["prompt"]))
    fresh = [p for p in heldout_prompts(data, 10 ** 9) if _key(p["messages"]) not in used]
    return fresh[:n]


def _key(prompt) -> str:
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    return json.dumps(prompt, sort_keys=True)


def _base_name(first: RunDir) -> Optional[str]:
    """What the oldest run was trained from: its model.name (a bundled name, a folder, a hub id)."""
    if not first.is_run():
        return None
    name = (read_yaml(first.config).get("model") or {}).get("name")
    return str(name) if name else None


def _vs_parent(child: RunDir, parent: Optional[RunDir], base: Optional[str], aliases: dict[str, Path]) -> Optional[WinRate]:
    if parent is None and base is None:
        return None
    started = Path.cwd()

    def names_child(model: str) -> bool:
        return _names_run(model, child, aliases, started)

    def names_parent(model: str) -> bool:
        if parent is None:  # the base model: named as the first run's config names it, or by an alias of it
            return model == base or (model in aliases and aliases[model] == Path(base).expanduser().resolve())
        return _names_run(model, parent, aliases, started)

    wins = losses = ties = 0
    files = [child.judgements] + ([parent.judgements] if parent is not None else [])
    for path in files:
        if not path.is_file():
            continue
        for row in _verdicts(path):
            a, b, winner = row["a"], row["b"], row["winner"]
            if names_parent(a) and names_child(b):
                mine = {"b": "win", "a": "loss"}.get(winner, "tie")
            elif names_child(a) and names_parent(b):
                mine = {"a": "win", "b": "loss"}.get(winner, "tie")
            else:
                continue
            wins, losses, ties = wins + (mine == "win"), losses + (mine == "loss"), ties + (mine == "tie")
    if not wins + losses + ties:
        return None
    decided = wins + losses
    low, high = wilson(wins, decided) if decided else (None, None)
    return WinRate(wins, losses, ties, wins / decided if decided else None, (low, high), sign_test(wins, losses))


def _verdicts(path: Path) -> list[dict]:
    """The usable verdicts of a judgements file (ties included), with the models they compared."""
    rows = []
    for row in read_jsonl(path):
        if (isinstance(row, dict) and row.get("winner") in ("a", "b", "tie") and isinstance(row.get("a"), str)
                and isinstance(row.get("b"), str)):
            rows.append(row)
    return rows


def _names_run(model: str, run: RunDir, aliases: dict[str, Path], started: Path) -> bool:
    here = run.path.resolve()
    if model == run.name or aliases.get(model) == here:
        return True
    path = Path(model).expanduser()
    for candidate in (path, run.path.parent.parent / path, started / path):
        try:
            if candidate.exists() and candidate.resolve() == here:
                return True
        except OSError:
            continue
    return False
