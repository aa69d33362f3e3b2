"""Headroom (objectives/headroom.py, evaluate/headroom.py): pass@k and the intervals by hand, the verdict on tiny
tables, an RL run measuring it before its first step, and `tunesmith eval --samples K`."""
import json
import math

import pytest
import torch

from conftest import write_jsonl
from test_train import tiny_cfg
from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.objectives.headroom import (bootstrap_mean, ks_for, pass_at_k, reward_headroom, summarise, verdict,
                                           wilson)
from tunesmith.objectives.rewards import Reward


def test_pass_at_k_by_hand():
    # Chen et al.: 1 - C(n - c, k) / C(n, k)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))  # 1 - 3/6 = 0.5
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)      # C(3, 3) / C(5, 3) = 1/10
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)            # pass@1 is the share right
    assert pass_at_k(8, 0, 8) == 0.0 and pass_at_k(8, 1, 8) == 1.0 and pass_at_k(4, 3, 2) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)
    assert ks_for(8) == [2, 4, 8] and ks_for(2) == [2] and ks_for(6) == [2, 4, 6]


def test_wilson_and_bootstrap_by_hand():
    # 5 of 10, z = 1.96: centre (0.5 + 1.96^2 / 20) / (1 + 1.96^2 / 10) = 0.5; half = 1.96 sqrt(0.025 + 1.96^2 / 400)
    # / (1 + 0.38415) = 1.96 sqrt(0.0346037) / 1.38415 = 1.96 x 0.186021 / 1.38415 = 0.263412
    low, high = wilson(5, 10)
    assert low == pytest.approx(0.5 - 0.263412, abs=1e-4) and high == pytest.approx(0.5 + 0.263412, abs=1e-4)
    assert wilson(0, 10)[0] == 0.0 and wilson(0, 10)[1] == pytest.approx(1.96 ** 2 / 10 / (1 + 1.96 ** 2 / 10), abs=1e-3)
    assert bootstrap_mean([2.0, 2.0, 2.0]) == (2.0, 2.0)
    low, high = bootstrap_mean([0.0, 1.0] * 50)
    assert low < 0.5 < high and high - low == pytest.approx(2 * 1.96 * 0.05, abs=0.03)  # sd 0.5 / sqrt(100)


def test_reward_headroom_by_hand_on_a_tiny_table():
    greedy = torch.tensor([1.0, 0.0, 0.0, 1.0, float("nan")], dtype=torch.float64)   # the last prompt has no gold
    sampled = torch.tensor([[1, 0], [0, 1], [0, 0], [1, 1], [0, 0]], dtype=torch.float64)
    sampled[4] = float("nan")
    h = reward_headroom(greedy, sampled)
    assert h["binary"] and h["prompts"] == 4
    assert h["pass@1"] == 0.5                          # 2 of 4 greedy answers right
    assert h["pass@1_sampled"] == 0.5                  # (1 + 1 + 0 + 2) / 8
    assert h["pass@2"] == 0.75                         # 3 of 4 prompts have a right sample (k = n: any right)
    assert h["pass@2_ci95"] == [round(v, 4) for v in wilson(3, 4)] and h["gain"] == 0.25
    soft = reward_headroom(torch.tensor([0.2, 0.4], dtype=torch.float64), torch.tensor([[0.1, 0.5], [0.3, 0.9]], dtype=torch.float64))
    assert not soft["binary"] and soft["greedy_mean"] == pytest.approx(0.3) and soft["sample_mean"] == pytest.approx(0.45)
    assert soft["best_of_k_mean"] == pytest.approx(0.7)   # (0.5 + 0.9) / 2
    assert reward_headroom(torch.tensor([float("nan")]), torch.full((1, 2), float("nan"))) is None


def _summary(greedy_rows, sampled_rows, kinds):
    rewards = [Reward(name, 1.0, None) for name in kinds]
    g = torch.tensor(greedy_rows, dtype=torch.float64)            # (rewards, n)
    s = torch.tensor(sampled_rows, dtype=torch.float64)           # (rewards, n, K)
    return summarise(rewards, kinds, g.sum(0), s.sum(0), g, s, s.shape[2], 0.0)


def test_verdict_says_warm_up_and_little_to_gain():
    kinds = {"numeric": "numeric", "format": "regex"}
    # never right, never in format: warm up
    h = _summary([[0, 0], [0, 0]], [[[0, 0], [0, 0]], [[0, 0], [0, 0]]], kinds)
    assert h["check"] == "numeric" and len(h["warnings"]) == 2
    assert all("warm up with SFT first" in w for w in h["warnings"]) and "format" in h["warnings"][0]
    # greedy right on 1 of 2 prompts, samples no better: little to gain
    h = _summary([[1, 0], [1, 1]], [[[1, 0], [0, 0]], [[1, 1], [1, 1]]], kinds)
    assert len(h["warnings"]) == 1 and h["warnings"][0].startswith("little to gain: pass@2 50.0 %")
    # samples find right answers greedy misses: nothing to warn about
    h = _summary([[0, 0], [1, 1]], [[[1, 0], [0, 1]], [[1, 1], [1, 1]]], kinds)
    assert h["rewards"]["numeric"]["pass@2"] == 1.0 and h["warnings"] == []
    # no 0/1 answer check (a reward model): best-of-K against greedy
    soft = {"model": "model"}
    flat = _summary([[0.5, 0.5, 0.5]], [[[0.5, 0.4], [0.5, 0.3], [0.4, 0.5]]], soft)
    assert flat["check"] is None and flat["warnings"][0].startswith("little to gain: the best of 2 samples")
    better = _summary([[0.1, 0.2, 0.1]], [[[0.5, 0.9], [0.8, 0.3], [0.4, 0.7]]], soft)
    assert verdict(better, soft) == []


def test_headroom_samples_of_one_is_refused_and_zero_is_off():
    with pytest.raises(TunesmithError, match="rl.headroom_samples. has value 1.*at least 2 samples"):
        load_config(None, ["rl.headroom_samples=1"])
    assert load_config(None, ["rl.headroom_samples=0"]).rl.headroom_samples == 0


@pytest.fixture
def number_prompts(tmp_path):
    return write_jsonl(tmp_path / "numbers.jsonl", [{"prompt": f"Say a number about {i}.", "answer": str(i % 3)}
                                                   for i in range(30)])


def test_an_rl_run_measures_its_headroom_before_the_first_step(tmp_path, tiny_model_dir, number_prompts):
    """The greedy half of the headroom check is the same answer the base's held-out measurement scores (same prompts,
    same rewards), so its pass@1 equals eval_reward_<name> before training; both land in metrics.jsonl and eval.json.
    The split holds 16 prompts, of which both take the first 8; a reward that reads the prompt (its number), not the
    answer, tells the prompts apart even though the tiny random model says the same thing to every one of them."""
    from tunesmith.train.loop import train

    rewards = tmp_path / "rewards.py"   # rewards that are not 0/1: best-of-K rather than pass@k
    rewards.write_text("def vowels(completions, **kw):\n    return [sum(c in 'aeiou' for c in x) / max(1, len(x)) for x in completions]\n"
                       "def about(prompts, **kw):\n    return [int(p.split('about ')[1].split('.')[0]) / 30 for p in prompts]\n")
    cfg = tiny_cfg(tmp_path, tiny_model_dir, number_prompts, "task=rl", "method.name=lora", "train.max_steps=1",
                   "data.val_size=16", "rl.group_size=2", "rl.max_new_tokens=6", "rl.headroom_examples=8",
                   "rl.headroom_samples=4",
                   f"rl.rewards=[{{kind: numeric, column: answer}}, {{kind: function, path: {rewards}:vowels}}, "
                   f"{{kind: function, path: {rewards}:about, weight: 0.0}}]")
    res = train(cfg)
    log = (res.run_dir / "train.log").read_text()
    assert "headroom before training" in log and "pass@4" in log
    first = json.loads((res.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    before = res.summary["before"]
    for row in (first, before):
        assert row["headroom_samples"] == 4 and row["headroom_prompts"] == 8
        assert row["headroom_numeric_pass_at_1"] == pytest.approx(row["eval_reward_numeric"], abs=1e-4)
        assert row["headroom_vowels_greedy"] == pytest.approx(row["eval_reward_vowels"], abs=1e-4)
        assert row["headroom_about_greedy"] == pytest.approx(row["eval_reward_about"], abs=1e-4)  # the same 8 prompts
        assert row["headroom_about_greedy"] == row["headroom_about_best_of_4"]                   # (it reads only them)
        assert row["headroom_vowels_greedy"] != row["headroom_vowels_best_of_4"]
        assert 0 <= row["headroom_numeric_pass_at_1"] <= row["headroom_numeric_pass_at_4"] <= 1
    assert "headroom before training (8 prompts): pass@1" in (res.run_dir / "report.html").read_text()
    if before["headroom_numeric_pass_at_4"] == 0:  # the random tiny model never says the number: it says so
        assert "warning: headroom: no sample of 4 was right (numeric)" in log and "warm up with SFT first" in log
    off = train(tiny_cfg(tmp_path, tiny_model_dir, number_prompts, "task=rl", "method.name=lora", "train.max_steps=1",
                         "rl.group_size=2", "rl.max_new_tokens=4", "rl.headroom_samples=0", "output.name=plain",
                         "rl.rewards=[{kind: numeric, column: answer}]"))
    assert "headroom before training" not in (off.run_dir / "train.log").read_text() and "headroom_samples" not in off.summary["before"]

    # tunesmith eval --samples K: the same numbers for the tuned model, and the base's, from the eval command
    from tunesmith.evaluate.headroom import evaluate_headroom

    said = []
    ev = evaluate_headroom(res.run_dir, 4, n=8, log=said.append)
    assert set(ev["models"]) == {"base", "tuned"} and ev["temperature"] == 1.0
    tuned = ev["models"]["tuned"]["rewards"]["numeric"]
    assert tuned["prompts"] == 8 and set(tuned) >= {"pass@1", "pass@2", "pass@4", "pass@4_ci95", "pass@1_sampled"}
    for model in ("base", "tuned"):  # the run's first 8 held-out prompts again, not 8 others spread over the 16
        assert ev["models"][model]["rewards"]["about"]["greedy_mean"] == pytest.approx(before["headroom_about_greedy"], abs=1e-4)
    kept = sorted((res.run_dir / "evaluations").glob("*-pass@4.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["models"]["base"]["samples"] == 4
    assert any(line.startswith("tuned: 8 prompts, greedy + 4 samples") for line in said)


def test_eval_samples_on_an_sft_run_names_its_check_and_refuses_bad_input(tmp_path, tiny_model_dir, number_prompts, capsys):
    from tunesmith.cli.main import main
    from tunesmith.evaluate.headroom import evaluate_headroom
    from tunesmith.train.loop import train

    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"Say {i % 3}.", "completion": f"#### {i % 3}", "answer": str(i % 3)}
                                               for i in range(30)])
    run = train(tiny_cfg(tmp_path, tiny_model_dir, sft, "method.name=lora", "train.max_steps=2")).run_dir
    assert main(["eval", str(run), "--samples", "1"]) == 2
    assert "--samples 1: pass@K against pass@1 needs K >= 2" in capsys.readouterr().err
    with pytest.raises(TunesmithError, match="not an RL run.*--check numeric:answer"):
        evaluate_headroom(run, 4)
    with pytest.raises(TunesmithError, match="the data has no column 'gold'"):
        evaluate_headroom(run, 4, checks=("numeric:gold",))
    with pytest.raises(TunesmithError, match="expected KIND"):
        evaluate_headroom(run, 4, checks=("nope",))
    said = []
    ev = evaluate_headroom(run, 2, n=6, checks=("numeric:answer", "regex:####"), with_base=False, temperature=0.7,
                           log=said.append)
    h = ev["models"]["tuned"]
    assert ev["temperature"] == 0.7 and h["check"] == "numeric" and h["rewards"]["regex"]["binary"]
    assert h["rewards"]["numeric"]["prompts"] == 6
