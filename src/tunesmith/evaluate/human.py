"""Human evaluation: blind A/B judgements of two models' answers to the same held-out prompts, and what they show.

A run's judgements are `runs/NAME/judgements.jsonl`, one line per judgement: {prompt, a, b, answer_a, answer_b,
winner: "a" | "b" | "tie", shown_first: "a" | "b", at}. `a` is the reference (usually the base), `b` the candidate
(the tuned model). The summary counts wins, losses and ties; the win rate is b's share of the decided pairs, with a
95 % Wilson interval, and an exact two-sided sign test of "b wins as often as it loses" (ties dropped, as the sign
test does). Written here because the statistic is three lines and scipy is not a dependency.

`wilson` and `sign_test` are the intervals and test of every win rate in tunesmith (judged comparisons, evaluate/judge.py,
too); `wilson` lives with the headroom check (objectives/headroom.py), which an RL run uses below this layer.
"""
from __future__ import annotations

import math
from pathlib import Path

from tunesmith.objectives.headroom import wilson  # the one Wilson interval (headroom's pass@k uses it too)
from tunesmith.run.files import read_jsonl
from tunesmith.run.layout import RunDir



def judgements(run_dir: Path) -> list[dict]:
    path = RunDir(run_dir).judgements
    return read_jsonl(path) if path.exists() else []


def summarize(rows: list[dict]) -> dict:
    """Wins / losses / ties of `b` against `a`, its win rate over decided pairs with a 95 % interval, and the sign
    test's p-value. Judgements of different model pairs are summarised per pair (the newest pair here)."""
    if not rows:
        return {"n": 0}
    a, b = rows[-1]["a"], rows[-1]["b"]
    mine = [r for r in rows if r["a"] == a and r["b"] == b]
    wins = sum(r["winner"] == "b" for r in mine)
    losses = sum(r["winner"] == "a" for r in mine)
    ties = len(mine) - wins - losses
    decided = wins + losses
    rate = wins / decided if decided else None
    low, high = wilson(wins, decided) if decided else (None, None)
    return {"a": a, "b": b, "n": len(mine), "wins": wins, "losses": losses, "ties": ties, "win_rate": rate,
            "ci95": [low, high], "p_sign_test": sign_test(wins, losses)}


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided binomial test of wins vs losses at p = 1/2."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def describe(s: dict) -> str:
    if not s.get("n"):
        return "no judgements yet"
    if s["win_rate"] is None:
        return f"{s['n']} judgements, all ties"
    return (f"{s['b']} vs {s['a']}: {s['wins']} wins, {s['losses']} losses, {s['ties']} ties; win rate "
            f"{100 * s['win_rate']:.0f} % (95 % interval {100 * s['ci95'][0]:.0f}-{100 * s['ci95'][1]:.0f} %), "
            f"sign test p = {s['p_sign_test']:.3g}")
