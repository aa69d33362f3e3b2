"""builtin:arithmetic's worked solutions and the arithmetic-sft / arithmetic-grpo recipes."""
import re

from tunesmith.config import load_config
from tunesmith.data.arithmetic import add_steps, multiply_steps, records, subtract_steps
from tunesmith.data.read import read_records

STEP = re.compile(r"(\d+) ([+\-x]) (\d+) = (\d+)$")
APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "x": lambda a, b: a * b}


def test_every_worked_solution_is_right_and_ends_on_the_answer():
    for r in records("arithmetic") + records("arithmetic-test"):
        *steps, last = r["response"].split("\n")
        assert last == f"#### {r['answer']}"
        assert steps
        for line in steps:
            a, op, b, c = STEP.search(line).groups()
            assert APPLY[op](int(a), int(b)) == int(c), (r["prompt"], line)
        assert STEP.search(steps[-1]).group(4) == r["answer"]


def test_steps_split_tens_and_units():
    assert add_steps(47, 38) == ["40 + 30 = 70", "7 + 8 = 15", "70 + 15 = 85"]
    assert add_steps(47, 30) == ["47 + 30 = 77"]
    assert subtract_steps(83, 47) == ["83 - 40 = 43", "43 - 7 = 36"]
    assert multiply_steps(7, 86) == ["7 x 80 = 560", "7 x 6 = 42", "560 + 42 = 602"]


def test_problems_are_those_of_version_1_and_the_splits_stay_disjoint():
    train, test = records("arithmetic"), records("arithmetic-test")
    assert (len(train), len(test)) == (3000, 500)
    assert train[0]["prompt"].startswith("What is 23 + 82?") and train[0]["answer"] == "105"  # the v1 seed's first
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    got = read_records("builtin:arithmetic-test")
    assert got[0].fields["response"] == test[0]["response"]


def test_recipes_chain_the_warm_up_into_grpo():
    sft, grpo = load_config("arithmetic-sft"), load_config("arithmetic-grpo")
    assert sft.data.columns == {"completion": "response"} and sft.output.name == "arithmetic-sft"
    assert grpo.model.name == "runs/arithmetic-sft" and grpo.task == "rl" and grpo.rl.group_size == 8
    assert [(r.kind, r.weight) for r in grpo.rl.rewards if r.weight] == [("numeric", 1.0)]
