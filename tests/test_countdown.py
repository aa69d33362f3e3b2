"""builtin:countdown: the generator, its checker (the `countdown` reward) and the countdown recipes."""
import torch

from tunesmith.config import RewardFunction, load_config
from tunesmith.data.countdown import check, records
from tunesmith.data.read import read_records
from tunesmith.objectives.rewards import Rollouts, build_rewards, score_all


def test_every_worked_solution_passes_the_checker():
    train, test = records("countdown"), records("countdown-test")
    assert (len(train), len(test)) == (3000, 500)
    assert all(check(r["response"], r["numbers"], r["answer"]) == 1.0 for r in train + test)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert read_records("builtin:countdown")[0].fields == train[0]


def test_checker_refuses_wrong_working():
    assert check("3 x 4 = 12\n12 + 5 = 17\n#### 17", "3 4 5", "17") == 1.0
    assert check("5 + 12 = 17\n3 x 4 = 12", "3 4 5", "17") == 0.0          # a result used before it exists
    assert check("3 x 4 = 12\n12 + 5 = 18\n#### 17", "3 4 5", "17") == 0.0  # wrong arithmetic
    assert check("3 x 5 = 15\n15 + 2 = 17", "3 4 5", "17") == 0.0           # 2 is not given, 4 unused
    assert check("4 x 4 = 16\n16 + 1 = 17", "4 1 5", "17") == 0.0           # 4 used twice, 5 unused
    assert check("3 x 4 = 12\n12 + 5 = 17", "3 4 5", "18") == 0.0           # another target
    assert check("#### 17", "3 4 5", "17") == 0.0                            # no working
    assert check("3 * 4 = 12\n5 + 12 = 17", "3 4 5", "17") == 1.0          # * for x, either order


def test_countdown_reward_scores_rollouts():
    [reward] = build_rewards([RewardFunction(kind="countdown")], torch.device("cpu"))
    rollouts = Rollouts(prompts=["p", "p"], completions=["3 x 4 = 12\n12 + 5 = 17", "3 + 4 = 7\n#### 17"],
                        completion_ids=[[], []], conversations=[[], []],
                        columns={"numbers": ["3 4 5", "3 4 5"], "answer": ["17", "17"]})
    total, _ = score_all([reward], rollouts)
    assert total.tolist() == [1.0, 0.0]


def test_recipes_chain_the_warm_up_into_grpo():
    sft, grpo = load_config("countdown-sft"), load_config("countdown-grpo")
    assert sft.data.path == "builtin:countdown" and sft.output.name == "countdown-sft"
    assert grpo.model.name == "runs/countdown-sft" and grpo.rl.rewards[0].kind == "countdown"
