"""Online RL (task: rl): the rewards by hand, the advantages and the clipped surrogate by hand, prompt-only data, and
end to end on a tiny model: GRPO raises a reward it can reach, RLOO / several updates / a KL to the adapter-off base
run and log what they should, and `tunesmith eval` scores a run's answers with its rewards against the base."""
import json

import pytest
import torch

from conftest import write_jsonl
from test_train import tiny_cfg
from tunesmith.config import RewardFunction, RLConfig, load_config
from tunesmith.errors import TunesmithError
from tunesmith.objectives.rewards import (Rollouts, build_rewards, exact_match, length_band, numeric_match, rouge_l,
                                          score_all)
from tunesmith.objectives.rl import group_advantages, surrogate
from tunesmith.train.loop import train

VOWELS = '''
def vowels(prompts, completions, completion_ids, answer, **kwargs):
    assert len(prompts) == len(completions) == len(completion_ids) == len(answer)
    return [sum(ch in "aeiou" for ch in c) / max(1, len(c)) for c in completions]
'''


@pytest.fixture
def prompts_file(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Say something about {i}.", "answer": str(i)} for i in range(40)])


@pytest.fixture
def vowel_reward(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(VOWELS)
    return f"rl.rewards=[{{kind: function, path: {path}:vowels}}]"


def rollouts(completions, **columns):
    n = len(completions)
    return Rollouts(["p"] * n, completions, [[1]] * n, [[{"role": "user", "content": "p"}]] * n,
                    {k: list(v) for k, v in columns.items()})


def test_builtin_rewards_by_hand():
    assert numeric_match("so 20 + 22 = 42.\n#### 42", "42") == 1.0
    assert numeric_match("I think 41", "Natalia sold 48/2 = 24 clips.\n#### 42") == 0.0
    assert numeric_match("#### $1,234.00", "1234") == 1.0
    assert numeric_match("no number here", "7") == 0.0
    assert numeric_match("7", "no gold number") is None
    assert exact_match("  Paris. ", "paris") == 1.0 and exact_match("work: 3 + 4\n#### 7", "7") == 1.0
    assert exact_match("It is 7", "7") == 0.0
    assert length_band("a b c", 2, 4) == 1.0 and length_band("a", 2, 4) == 0.0 and length_band("w " * 6, 2, 4) == 0.5
    assert rouge_l("the cat sat", ["the cat sat"]) == pytest.approx(1.0)
    assert rouge_l("dog", ["the cat sat", "a dog ran"]) > 0 == rouge_l("xyz", ["the cat"])


def test_score_all_weights_rewards_and_leaves_out_none(tmp_path):
    specs = [RewardFunction(kind="numeric", column="answer", weight=2.0),
             RewardFunction(kind="regex", pattern=r"#### -?\d+\s*$", weight=0.5, name="format")]
    rewards = build_rewards(specs, torch.device("cpu"))
    total, table = score_all(rewards, rollouts(["#### 4", "4", "#### 5"], answer=["4", "4", "no number"]))
    assert table[0, :2].tolist() == [1.0, 1.0] and torch.isnan(table[0, 2])
    assert total.tolist() == [2.5, 2.0, 0.5]
    with pytest.raises(TunesmithError, match="no column 'gold'"):
        score_all(build_rewards([RewardFunction(kind="exact", column="gold")], torch.device("cpu")), rollouts(["x"]))
    with pytest.raises(TunesmithError, match="two rewards are called"):
        build_rewards([RewardFunction(kind="regex", pattern="a")] * 2, torch.device("cpu"))


def test_user_reward_gets_trl_arguments_and_a_wrong_count_fails(tmp_path):
    path = tmp_path / "r.py"
    path.write_text(VOWELS + "\ndef short(completions, **kw):\n    return [1.0]\n")
    good = build_rewards([RewardFunction(kind="function", path=f"{path}:vowels")], torch.device("cpu"))
    total, _ = score_all(good, rollouts(["aa", "xx"], answer=["1", "2"]))
    assert total.tolist() == [1.0, 0.0]
    bad = build_rewards([RewardFunction(kind="function", path=f"{path}:short")], torch.device("cpu"))
    with pytest.raises(TunesmithError, match="returned 1 values for 2 completions"):
        score_all(bad, rollouts(["a", "b"]))
    with pytest.raises(TunesmithError, match="no function 'missing'"):
        build_rewards([RewardFunction(kind="function", path=f"{path}:missing")], torch.device("cpu"))


def test_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    centred = r - 0.5
    assert torch.allclose(group_advantages(r, "grpo", "none"), centred.float())
    assert torch.allclose(group_advantages(r, "grpo", "group"), (centred / (r.std() + 1e-4)).float())
    assert torch.allclose(group_advantages(r, "grpo", "batch", 2.0), (centred / (2.0 + 1e-4)).float())
    loo = torch.tensor([1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3])
    assert torch.allclose(group_advantages(r, "rloo", "group"), loo)
    assert group_advantages(torch.ones(4, dtype=torch.float64), "grpo", "group").abs().max() == 0


def test_clipped_surrogate_and_kl_by_hand():
    cfg = RLConfig(epsilon=0.2, beta=0.1)
    logps = torch.log(torch.tensor([[0.5, 0.5]]))
    old = torch.log(torch.tensor([[0.25, 0.5]]))        # ratios 2.0 and 1.0
    adv, mask = torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool)
    per_token, stats = surrogate(logps, old, logps.clone(), adv, mask, cfg)
    assert per_token[0].tolist() == pytest.approx([-1.2, -1.0])  # min(2 A, 1.2 A); ratio 1 unclipped; KL 0 (ref = policy)
    assert stats["clipped"] == 1 and stats["kl"] == pytest.approx(0.0)
    first, _ = surrogate(logps, None, None, torch.tensor([-0.5]), mask, cfg)  # first update: ratio 1, loss -A
    assert first[0].tolist() == pytest.approx([0.5, 0.5])
    ref = torch.log(torch.tensor([[0.25, 0.5]]))
    with_kl, stats = surrogate(logps, None, ref, adv, mask, cfg)
    k3 = 0.5 - torch.log(torch.tensor(0.5)) - 1             # exp(ref - logp) - (ref - logp) - 1
    assert with_kl[0, 0] == pytest.approx(-1 + 0.1 * float(k3)) and stats["kl"] > 0


def test_prompt_only_data_in_text_and_chat_shape(tmp_path, tiny_tokenizer):
    from tunesmith.data.prepare import prepare

    rows = [{"prompt": "Add 2 and 3.", "answer": "5"},
            {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 1 and 1."}], "answer": "2"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows * 5)
    cfg = load_config(None, [f"data.path={path}", "data.val_size=2", "task=rl", "rl.rewards=[{kind: numeric, column: answer}]"])
    data = prepare(cfg.data, tiny_tokenizer, for_inspection=True, prompts_only=True)
    assert data.format == "prompt"
    ex, r, t = data.train.examples[0], data.train.rendered[0], data.train.tokens[0]
    assert r.prompt.endswith("<|im_start|>assistant\n") and r.reference == "" and ex.columns["answer"] in ("5", "2")
    assert (t.labels == -100).all() and tiny_tokenizer.decode(t.input_ids) == r.prompt
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Q{i}?", "chosen": "good", "rejected": "bad"} for i in range(6)])
    cfg = load_config(None, [f"data.path={pairs}", "data.val_size=2", "task=rl", "rl.rewards=[{kind: rouge}]"])
    data = prepare(cfg.data, tiny_tokenizer, for_inspection=True, prompts_only=True)
    assert data.format == "preference" and data.train.rendered[0].reference == "good"  # a pair's prompts, for RL
    assert data.train.rendered[0].prompt.endswith("<|im_start|>assistant\n")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    with pytest.raises(TunesmithError, match="bad.jsonl:1: 'prompt' ends with a assistant turn"):
        prepare(load_config(None, [f"data.path={bad}"]).data, tiny_tokenizer)


def test_rl_config_is_checked_before_loading(tmp_path, tiny_model_dir, prompts_file):
    with pytest.raises(TunesmithError, match="task=rl learns from rewards: set rl.rewards"):
        tiny_cfg(tmp_path, tiny_model_dir, prompts_file, "task=rl")
    with pytest.raises(TunesmithError, match="rl.rewards is read by task=rl only"):
        tiny_cfg(tmp_path, tiny_model_dir, prompts_file, "task=causal", "rl.rewards=[{kind: length, min_words: 1, max_words: 3}]")
    with pytest.raises(TunesmithError, match="needs `pattern`"):
        load_config(None, ["rl.rewards=[{kind: regex}]"])
    with pytest.raises(TunesmithError, match="not supported for task=rl"):
        tiny_cfg(tmp_path, tiny_model_dir, prompts_file, "task=rl", "method.name=ia3",
                 "rl.rewards=[{kind: length, min_words: 1, max_words: 3}]")
    for reward, says in ((f"{{kind: model, path: {tmp_path / 'runs' / 'hh-reward'}}}", "no reward-model run"),
                         (f"{{kind: function, path: {tmp_path / 'nope.py'}:f}}", "no file")):
        with pytest.raises(TunesmithError, match=says):  # before the data and the model load
            train(tiny_cfg(tmp_path, tiny_model_dir, prompts_file, "task=rl", f"rl.rewards=[{reward}]"))
        assert not (tmp_path / "runs" / "t").exists()
    (tmp_path / "runs" / "hh-reward-20261204-0101" / "final").mkdir(parents=True)  # an unnamed run of that recipe
    with pytest.raises(TunesmithError, match="newest finished run of that recipe is .*hh-reward-20261204-0101"):
        train(tiny_cfg(tmp_path, tiny_model_dir, prompts_file, "task=rl",
                       f"rl.rewards=[{{kind: model, path: {tmp_path / 'runs' / 'hh-reward'}}}]"))


def test_grpo_raises_a_reward_and_logs_its_health(tmp_path, tiny_model_dir, prompts_file, vowel_reward):
    """A full fine-tune of the tiny model (its output embeddings trained: they are its head) learns to answer in
    vowels; every step logs the rollout's health."""
    cfg = tiny_cfg(tmp_path, tiny_model_dir, prompts_file, "task=rl", "method.name=full", "method.freeze_embeddings=false",
                   "train.max_steps=24", "train.lr=2e-2", "rl.group_size=4", "rl.max_new_tokens=12", vowel_reward)
    res = train(cfg)
    rows = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward" in r]
    assert len(steps) == 24
    first, last = (sum(r["reward"] for r in part) / len(part) for part in (steps[:4], steps[-4:]))
    assert last > first + 0.3, (first, last)
    assert steps[-1]["entropy"] < steps[0]["entropy"]
    assert res.summary["forgetting"]["mean_kl"] > 0  # the policy moved on general text too, and the check says by how much
    for key in ("reward_std", "frac_reward_zero_std", "completion_length", "clipped_ratio", "rewards/vowels/mean",
                "rollout_seconds", "reward_seconds", "update_seconds", "clip_ratio", "completion_tokens", "skipped_groups"):
        assert key in steps[0], key
    s = res.summary
    assert s["task"] == "rl" and {"eval_reward", "eval_reward_vowels", "eval_length"} <= set(s["after"])
    assert (res.run_dir / "final" / "config.json").exists() and (res.run_dir / "report.html").exists()
    assert (res.run_dir / "rl.png").exists() and "held-out reward" in (res.run_dir / "report.html").read_text()
    # tunesmith eval: the run's rewards on its answers, the tuned model against the base example by example
    from tunesmith.evaluate.evaluation import evaluate_run

    ev = evaluate_run(res.run_dir, data_path=str(prompts_file), n=12, log=lambda *a: None)
    assert ev["task"] == "rl" and ev["metrics"]["tuned"]["reward_vowels"] > ev["metrics"]["base"]["reward_vowels"]
    against = ev["tuned_against"]["base"]
    assert against["won"] > against["lost"] and 0 <= against["p_value"] <= 1


def test_rloo_lora_with_kl_and_two_updates_per_batch(tmp_path, tiny_model_dir, prompts_file, vowel_reward):
    cfg = tiny_cfg(tmp_path, tiny_model_dir, prompts_file, "task=rl", "method.name=lora", "train.max_steps=6",
                   "train.lr=5e-2", "rl.algorithm=rloo", "rl.loss=grpo", "rl.beta=0.1", "rl.updates=2",
                   "rl.group_size=3", "rl.max_new_tokens=8", vowel_reward)
    res = train(cfg)
    steps = [r for r in (json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()) if "reward" in r]
    assert [r.get("rollout_reused", 0) for r in steps] == [0, 1] * 3  # each batch of rollouts trains two steps
    assert steps[1]["reward"] == steps[0]["reward"]
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6) and steps[-1]["kl"] > 0  # the adapter starts as the base
    assert any(r["clip_ratio"] > 0 for r in steps[1::2])  # a second update on the same rollouts is clipped somewhere


def test_a_reward_model_run_is_a_reward(tmp_path, tiny_model_dir, prompts_file):
    """A tiny reward model trained to prefer "Yes, ..." answers scores RL completions as it scored its pairs (the
    conversation plus the answer rendered as it was trained), and an RL run learns from it."""
    from tunesmith.data.prepare import prepare
    from tunesmith.models.heads import sequence_scores
    from tunesmith.objectives.rewards import RewardModelScorer

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Say something about {i}.", "chosen": f"Yes, {i} is fine.",
                                                    "rejected": "No."} for i in range(40)])
    rm = train(tiny_cfg(tmp_path, tiny_model_dir, pairs, "task=reward", "method.name=full", "train.max_steps=12",
                        "train.lr=1e-3", "output.name=rm"))
    scorer = RewardModelScorer(str(rm.run_dir), torch.device("cpu"))
    conv = [{"role": "user", "content": "Say something about 3."}]
    got = scorer(Rollouts(["p", "p"], ["Yes, 3 is fine.", "No."], [[1], [1]], [conv, conv], {}))
    assert got[0] > got[1]
    val = prepare(load_config(str(rm.run_dir / "config.yaml")).data, scorer.tokenizer).val.tokens[0]
    pair_text = scorer.tokenizer.decode(val.input_ids)  # the chosen side as training tokenized it
    user = pair_text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
    answer = pair_text.split("<|im_start|>assistant\n", 1)[1].split("<|im_end|>", 1)[0]
    ours = scorer(Rollouts(["p"], [answer], [[1]], [[{"role": "user", "content": user}]], {}))[0]
    ids = torch.from_numpy(val.input_ids).long()[None]
    assert ours == pytest.approx(float(sequence_scores(scorer.model, ids, scorer.tokenizer.pad_token_id)[0, 0]), abs=1e-5)
    res = train(tiny_cfg(tmp_path, tiny_model_dir, prompts_file, "task=rl", "method.name=lora", "train.max_steps=2",
                         "rl.group_size=2", "rl.max_new_tokens=6", f"rl.rewards=[{{kind: model, path: {rm.run_dir}}}]",
                         "output.name=rl"))
    steps = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "rewards/model/mean" in steps[1] and "eval_reward_model" in res.summary["after"]
    from tunesmith.evaluate.evaluation import evaluate_run
    ev = evaluate_run(res.run_dir, data_path=str(pairs), n=4, log=lambda *a: None)  # a pair file's prompts, scored
    assert ev["examples"] == 4 and ev["side_by_side"][0]["reference"].startswith("Yes, ")  # the chosen answer
    assert all(ev["metrics"][m]["reward_model"] is not None for m in ("base", "tuned")) and "base" in ev["tuned_against"]


def test_warnings_fire_on_flat_groups_and_on_lengths_rising_to_the_cap():
    from types import SimpleNamespace

    from tunesmith.objectives.rl import WARN_EVERY, OnlineRL

    said = []
    state = SimpleNamespace(log=said.append, flat_steps=0, capped_start=None, capped_warned=-WARN_EVERY,
                            rl=SimpleNamespace(max_new_tokens=64))
    for step in range(4):
        OnlineRL._warn(state, 1.0, 0.1, step)
    assert len(said) == 1 and "all-equal rewards" in said[0] and said[0].startswith("warning: step 3:")
    OnlineRL._warn(state, 0.0, 0.2, 4)
    assert len(said) == 1  # lengths at 20 % of the cap, from 10 %: nothing to say
    for step in range(5, 8):
        OnlineRL._warn(state, 0.0, 0.9, step)
    assert len(said) == 2 and "reward hacking" in said[1] and "(10% at the start)" in said[1]  # once, not every step
    long_from_the_start = SimpleNamespace(log=said.append, flat_steps=0, capped_start=None, capped_warned=-WARN_EVERY,
                                          rl=SimpleNamespace(max_new_tokens=64))
    OnlineRL._warn(long_from_the_start, 0.0, 0.9, 0)
    OnlineRL._warn(long_from_the_start, 0.0, 0.95, 1)
    assert len(said) == 3 and said[2].startswith("note: 90% of the first completions")


def test_a_group_with_equal_rewards_is_skipped_exactly(tmp_path, tiny_model_dir, prompts_file):
    """A reward every answer gets (length band 0..1000 words) gives every group advantages 0: with no KL term the
    passes are skipped, and the weights stay exactly where they started."""
    cfg = tiny_cfg(tmp_path, tiny_model_dir, prompts_file, "task=rl", "method.name=full", "method.freeze_embeddings=false",
                   "train.max_steps=2", "rl.group_size=2", "rl.max_new_tokens=4",
                   "rl.rewards=[{kind: length, min_words: 0, max_words: 1000}]")
    res = train(cfg)
    steps = [r for r in (json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()) if "reward" in r]
    assert all(r["frac_reward_zero_std"] == 1.0 and r["skipped_groups"] == 1.0 and r["grad_norm"] == 0 for r in steps)
    from transformers import AutoModelForCausalLM

    before, after = AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoModelForCausalLM.from_pretrained(res.run_dir / "final")
    assert all(torch.equal(p, q) for p, q in zip(before.state_dict().values(), after.state_dict().values()))


@pytest.mark.parametrize("method", ["qlora", "lora-int8"])
def test_reward_models_and_rl_train_over_a_quantized_base(tmp_path, wide_tiny_model_dir, prompts_file, vowel_reward, method):
    """A reward model's adapter and head learn over a 4-bit / 8-bit base; GRPO samples, updates and measures its KL
    against that base with the adapter off (0 before the first update, then not)."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Say something about {i}.", "chosen": f"Yes, {i} is fine.",
                                                    "rejected": "No."} for i in range(40)])
    rm = train(tiny_cfg(tmp_path, wide_tiny_model_dir, pairs, "task=reward", f"method.name={method}", "train.max_steps=8",
                        "train.lr=1e-3", "output.name=rm"))
    assert rm.summary["after"]["eval_margin"] > rm.summary["before"]["eval_margin"] + 0.2
    res = train(tiny_cfg(tmp_path, wide_tiny_model_dir, prompts_file, "task=rl", f"method.name={method}", "train.max_steps=4",
                         "rl.group_size=3", "rl.max_new_tokens=8", "rl.beta=0.1", "rl.updates=2", vowel_reward,
                         "output.name=rl"))
    steps = [r for r in (json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()) if "reward" in r]
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6) and steps[-1]["kl"] > 0
    assert (res.run_dir / "final" / "adapter_model.safetensors").exists()


def test_a_reward_without_its_answer_column_stops_before_the_run_starts(tmp_path, tiny_model_dir, prompts_file):
    """The prompts have an `answer` column and no responses: a reward reading another column, or comparing with the
    response, stops in one line before the run folder exists and before anything is sampled."""
    for reward, says in (("{kind: numeric, column: gold}", r"rl.rewards\[0\] \(numeric\): the data has no column 'gold' "
                                                            r"\(columns: answer, prompt\)"),
                         ("{kind: exact}", r"rl.rewards\[0\] \(exact\): no `column` is set and the records have no response")):
        with pytest.raises(TunesmithError, match=says):
            train(tiny_cfg(tmp_path, tiny_model_dir, prompts_file, "task=rl", f"rl.rewards=[{reward}]"))
        assert not (tmp_path / "runs" / "t").exists()
