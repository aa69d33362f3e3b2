"""The built-in verifiable task: arithmetic word problems with one numeric answer, for online RL from an exact or
numeric reward (`builtin:arithmetic`, 3000 problems; `builtin:arithmetic-test`, 500 others, none of whose questions
is in the training set). Generated here from a fixed seed, so they are the same on every machine and need no
download; no public math set ships in a PyPI package this project can read without a hub.

Each record: `prompt` (the question and how to give the answer: after `####`, as GSM8K does), `answer` (the number,
what a reward checks), `response` (a worked solution: one small step a line -- tens and units apart, the products of
a story first -- then `#### N`, the target of the `arithmetic-sft` warm-up, as GSM8K's solutions are), `kind` (the
template). Half are one operation on two numbers ("What is 47 + 38?"), half two-step stories ("Ana has 23 apples.
She buys 3 bags of 6 apples. How many apples does she have now?").

The questions are drawn from the seeds of version 1 (`SEED_VERSION`), so the 500 held-out problems are the ones every
earlier result was measured on; `VERSION` (the cache's identity) changed when the records gained `response`.
"""
from __future__ import annotations

import random

VERSION = 2
SEED_VERSION = 1
SIZES = {"arithmetic": 3000, "arithmetic-test": 500}
INSTRUCTION = "Solve the problem. End your answer with a line '#### N', where N is the final number."
NAMES = ["Ana", "Ben", "Chen", "Dana", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kofi", "Lena", "Maya", "Noor"]
THINGS = ["apples", "stickers", "marbles", "books", "coins", "pencils", "shells", "cards"]


def add_steps(a: int, b: int) -> list[str]:
    """a + b in steps a small model can copy: tens, then units, then the two together (one line when either is < 10
    or a whole number of tens)."""
    if a < 10 or b < 10 or a % 10 == 0 or b % 10 == 0:
        return [f"{a} + {b} = {a + b}"]
    tens, units = a // 10 * 10 + b // 10 * 10, a % 10 + b % 10
    return [f"{a // 10 * 10} + {b // 10 * 10} = {tens}", f"{a % 10} + {b % 10} = {units}", f"{tens} + {units} = {tens + units}"]


def subtract_steps(a: int, b: int) -> list[str]:
    """a - b: take away the tens of b, then its units."""
    if b < 10 or b % 10 == 0:
        return [f"{a} - {b} = {a - b}"]
    rest = a - b // 10 * 10
    return [f"{a} - {b // 10 * 10} = {rest}", f"{rest} - {b % 10} = {rest - b % 10}"]


def multiply_steps(a: int, b: int) -> list[str]:
    """a x b with b < 100: a x the tens of b, a x its units, the sum."""
    if b < 10 or b % 10 == 0:
        return [f"{a} x {b} = {a * b}"]
    tens, units = a * (b // 10 * 10), a * (b % 10)
    return [f"{a} x {b // 10 * 10} = {tens}", f"{a} x {b % 10} = {units}", f"{tens} + {units} = {tens + units}"]


def _one_step(rng: random.Random) -> tuple[str, int, str, list[str]]:
    op = rng.choice("+-x")
    if op == "+":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"What is {a} + {b}?", a + b, "add", add_steps(a, b)
    if op == "-":
        a = rng.randint(20, 99)
        b = rng.randint(1, a - 1)
        return f"What is {a} - {b}?", a - b, "subtract", subtract_steps(a, b)
    a, b = rng.randint(2, 12), rng.randint(3, 99)
    return f"What is {a} x {b}?", a * b, "multiply", multiply_steps(a, b)


def _two_step(rng: random.Random) -> tuple[str, int, str, list[str]]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    have = rng.randint(5, 40)
    story = rng.randrange(3)
    if story == 0:
        bags, each = rng.randint(2, 6), rng.randint(2, 9)
        steps = [f"{bags} bags of {each}: {bags} x {each} = {bags * each}", *add_steps(have, bags * each)]
        return (f"{name} has {have} {thing}. {name} buys {bags} bags with {each} {thing} in each bag. "
                f"How many {thing} does {name} have now?", have + bags * each, "buy", steps)
    if story == 1:
        given = rng.randint(1, have - 1) if have > 1 else 0
        found = rng.randint(1, 20)
        steps = [*subtract_steps(have, given), *add_steps(have - given, found)]
        return (f"{name} has {have} {thing}, gives {given} to a friend and then finds {found} more. "
                f"How many {thing} does {name} have now?", have - given + found, "give", steps)
    friends, each = rng.randint(2, 5), rng.randint(2, 8)
    total = friends * each + rng.randint(0, 10)
    steps = [f"{friends} friends get {each} each: {friends} x {each} = {friends * each}",
             *subtract_steps(total, friends * each)]
    return (f"{name} has {total} {thing} and gives {each} to each of {friends} friends. "
            f"How many {thing} are left?", total - friends * each, "share", steps)


def _questions(rng: random.Random, n: int, exclude: set[str]) -> list[dict]:
    out, seen = [], set(exclude)
    while len(out) < n:
        question, answer, kind, steps = (_one_step if rng.random() < 0.5 else _two_step)(rng)
        if question in seen:
            continue
        seen.add(question)
        out.append({"prompt": f"{question}\n{INSTRUCTION}", "answer": str(answer),
                    "response": "\n".join([*steps, f"#### {answer}"]), "kind": kind})
    return out


def records(name: str) -> list[dict]:
    """The problems of `builtin:<name>` (arithmetic or arithmetic-test), in a fixed order."""
    train = _questions(random.Random(f"arithmetic-v{SEED_VERSION}-train"), SIZES["arithmetic"], set())
    if name == "arithmetic":
        return train
    asked = {r["prompt"].split("\n", 1)[0] for r in train}
    return _questions(random.Random(f"arithmetic-v{SEED_VERSION}-test"), SIZES["arithmetic-test"], asked)
