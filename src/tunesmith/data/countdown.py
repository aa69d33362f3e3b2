"""The second built-in verifiable task: countdown number puzzles (`builtin:countdown`, 3000 puzzles;
`builtin:countdown-test`, 500 others, none of whose questions is in the training set). Reach a target from three
given numbers with + - x, each number used once: a search whose answers a program checks, so a few samples find a
solution far more often than one does (the headroom RL needs), as in TinyZero's countdown task.

Generated here from a fixed seed (the same on every machine, no download). Our own generator rather than
`reasoning-gym`'s: reasoning-gym 0.1.25 pulls ten more packages (ARC, Rubik's cube, cellular-automata libraries)
into the environment, and its countdown records carry one expression, not the worked steps a supervised warm-up
needs.

Each record: `prompt` (the numbers, the target and how to answer), `numbers` (the three numbers, space-separated),
`answer` (the target), `response` (a worked solution: one operation a line, `a op b = c`, each using given numbers or
the line before's result, then `#### target`: the target of the `countdown-sft` warm-up) and `kind` (`countdown`).

`check(completion, numbers, target)` is the reward (`rl.rewards: [{kind: countdown}]`): 1 when the completion's
operation lines are all right, use every given number exactly once (an operand is a given number not yet used or
an earlier line's result not yet used), and the last result is the target; else 0.
"""
from __future__ import annotations

import random
import re
from collections import Counter

VERSION = 1
SIZES = {"countdown": 3000, "countdown-test": 500}
COUNT = 3  # numbers per puzzle
INSTRUCTION = ("Use each number exactly once, with + - x, to reach the target. Write one operation a line "
               "(like '4 x 5 = 20'), then a line '#### N' with the target.")
STEP = re.compile(r"(\d+)\s*([+\-x*×])\s*(\d+)\s*=\s*(-?\d+)")
APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "x": lambda a, b: a * b}


def _puzzle(rng: random.Random) -> tuple[list[int], int, list[str]] | None:
    """Three numbers, a target reached from them in two operations, and those operations (None: a dull draw)."""
    numbers = [rng.randint(1, 25) for _ in range(COUNT)]
    a, b, c = rng.sample(numbers, COUNT)
    op1, op2 = rng.choice("+-x"), rng.choice("+-x")
    if op1 == "-" and a < b:
        a, b = b, a
    first = APPLY[op1](a, b)
    left, right = (first, c) if op2 != "-" or first >= c else (c, first)
    target = APPLY[op2](left, right)
    if not 10 <= target <= 400 or first <= 0 or target in numbers:
        return None
    return numbers, target, [f"{a} {op1} {b} = {first}", f"{left} {op2} {right} = {target}"]


def _records(rng: random.Random, n: int, exclude: set[str]) -> list[dict]:
    out, seen = [], set(exclude)
    while len(out) < n:
        drawn = _puzzle(rng)
        if drawn is None:
            continue
        numbers, target, steps = drawn
        question = f"Numbers: {' '.join(map(str, numbers))}. Target: {target}."
        if question in seen:
            continue
        seen.add(question)
        out.append({"prompt": f"{question}\n{INSTRUCTION}", "numbers": " ".join(map(str, numbers)),
                    "answer": str(target), "response": "\n".join([*steps, f"#### {target}"]), "kind": "countdown"})
    return out


def records(name: str) -> list[dict]:
    """The puzzles of `builtin:<name>` (countdown or countdown-test), in a fixed order."""
    train = _records(random.Random(f"countdown-v{VERSION}-train"), SIZES["countdown"], set())
    if name == "countdown":
        return train
    asked = {r["prompt"].split("\n", 1)[0] for r in train}
    return _records(random.Random(f"countdown-v{VERSION}-test"), SIZES["countdown-test"], asked)


def check(completion: str, numbers: str, target: str) -> float:
    """1.0 when the completion's operation lines reach `target` from `numbers` (space-separated), each used once."""
    unused = Counter(int(x) for x in str(numbers).split())
    results: Counter = Counter()
    last = None
    steps = [m.groups() for line in completion.split("\n") if (m := STEP.search(line))]
    if not steps:
        return 0.0
    for a, op, b, c in steps:
        x, y, z = int(a), int(b), int(c)
        if APPLY["x" if op in "*×" else op](x, y) != z:
            return 0.0
        for operand in (x, y):
            if results[operand]:  # an earlier result first: "3 + 4 = 7, 7 x 7" uses the result, then the number
                results[operand] -= 1
            elif unused[operand]:
                unused[operand] -= 1
            else:
                return 0.0
        results[z] += 1
        last = z
    return float(last == int(target) and not +unused and sum(results.values()) == 1)
