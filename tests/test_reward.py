"""Reward models (task: reward): the Bradley-Terry loss by hand; scores equal what plain transformers computes for the
saved model; training on pairs raises held-out pairwise accuracy for every method that claims the task; `tunesmith
eval` on a pair file gives accuracy, a 95 % interval and an exact sign test against chance."""
import json

import pytest
import torch

from conftest import write_jsonl
from test_train import tiny_cfg
from tunesmith.catalog import methods_for
from tunesmith.objectives.reward import bradley_terry_losses
from tunesmith.train.loop import train


@pytest.fixture
def pairs_file(tmp_path):
    rows = [{"prompt": f"Is {i} a nice number?", "chosen": f"Yes, {i} is a fine number.", "rejected": "No. Go away."}
            for i in range(48)]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def test_bradley_terry_loss_with_margin_and_centering_by_hand():
    c, r = torch.tensor([1.0, -0.5]), torch.tensor([0.2, 0.5])
    plain = -torch.log(torch.sigmoid(c - r))
    assert torch.allclose(bradley_terry_losses(c, r), plain)
    with_margin = -torch.log(torch.sigmoid(c - r - 0.3)) + 0.01 * (c + r) ** 2
    assert torch.allclose(bradley_terry_losses(c, r, 0.3, 0.01), with_margin)


@pytest.mark.parametrize("method", methods_for("reward"))
def test_reward_model_learns_the_pairs_and_loads_in_plain_transformers(tmp_path, tiny_model_dir, pairs_file, method):
    cfg = tiny_cfg(tmp_path, tiny_model_dir, pairs_file, "task=reward", f"method.name={method}", "train.max_steps=16",
                   "train.lr=" + ("1e-3" if method == "full" else "1e-2"))
    res = train(cfg)
    s = res.summary
    assert s["task"] == "reward"
    assert s["after"]["eval_accuracy"] > 0.9 and s["after"]["eval_margin"] > 0
    assert s["after"]["eval_loss"] < s["before"]["eval_loss"]
    assert len(s["side_by_side"]) == 2 and "chosen" in s["side_by_side"][0]["tuned"]
    if method not in ("full", "lora"):
        return
    # tunesmith eval on a pair file: accuracy with its interval and the sign test, the base (an untrained head) left out
    from tunesmith.evaluate.evaluation import evaluate_run

    rows = [json.loads(x) for x in pairs_file.read_text().splitlines()][:19]
    rows.append({**rows[0], "prompt": "Is 0 a nice number? " + "Think it over. " * 300})  # over data.max_length
    test_file = write_jsonl(tmp_path / "test_pairs.jsonl", rows)
    ev = evaluate_run(res.run_dir, data_path=str(test_file), n=20, log=lambda *a: None)
    m = ev["metrics"]["tuned"]
    assert "base" not in ev["metrics"] and m["eval_pairs"] == 20  # the long pair too, cut at its start
    assert m["pairs_right"] + m["pairs_wrong"] <= 20 and m["eval_accuracy"] > 0.9
    assert m["eval_accuracy_ci95"][0] < m["eval_accuracy"] <= m["eval_accuracy_ci95"][1]
    assert m["p_sign_test"] < 0.01
    assert json.loads((res.run_dir / "evaluation.json").read_text())["metrics"]["tuned"] == m
    # saved as transformers / peft load it: one label, and the score training measured
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tunesmith.data.prepare import prepare
    from tunesmith.methods.load import load_model
    from tunesmith.models.heads import sequence_scores

    final = res.run_dir / "final"
    if method == "full":
        plain = AutoModelForSequenceClassification.from_pretrained(final)
    else:
        from peft import AutoPeftModelForSequenceClassification

        plain = AutoPeftModelForSequenceClassification.from_pretrained(final, num_labels=1)
    tok = AutoTokenizer.from_pretrained(final)
    plain.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    assert plain.config.num_labels == 1
    pair = prepare(cfg.data, tok).val.tokens[0]
    ids = torch.from_numpy(pair.input_ids)[None]
    with torch.no_grad():
        theirs = float(plain.eval()(input_ids=ids).logits[0, 0])
        ours = sequence_scores(load_model(final, torch.float32, torch.device("cpu")).eval(), ids, plain.config.pad_token_id)
    assert float(ours[0, 0]) == pytest.approx(theirs, abs=1e-4)


def test_scores_of_a_pair_sharing_its_prompt_equal_plain_transformers_row_by_row():
    """Two right-padded rows with a 40-token common prefix take the shared-prefix path (one prefill, repeated); the
    scores equal the plain classifier's on each row alone, read at its last non-pad token."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from tunesmith.models.heads import sequence_scores

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, num_labels=1, pad_token_id=0)
    model = LlamaForSequenceClassification(config).eval()
    prompt = torch.randint(3, 300, (40,))
    chosen, rejected = torch.randint(3, 300, (9,)), torch.randint(3, 300, (5,))
    ids = torch.zeros(2, 49, dtype=torch.long)
    ids[0] = torch.cat([prompt, chosen])
    ids[1, :45] = torch.cat([prompt, rejected])
    with torch.no_grad():
        ours = sequence_scores(model, ids, pad_id=0)[:, 0]
        plain = [float(model(input_ids=torch.cat([prompt, answer])[None]).logits[0, 0]) for answer in (chosen, rejected)]
    assert ours.tolist() == pytest.approx(plain, abs=1e-5)


def test_mean_pooling_reads_the_answer_tokens_everywhere_a_reward_model_is_scored(tmp_path, tiny_model_dir, pairs_file):
    """`reward.pooling: mean`: the score is the head's per-token score averaged over the answer's tokens. Training,
    `tunesmith eval`, RL's reward-model scorer and the few lines docs/methods.md gives for plain transformers agree on
    it, and it is not the last token's score (which a run that does not record its pooling would be read at)."""
    from transformers import AutoModelForSequenceClassification

    from tunesmith.config import load_config
    from tunesmith.data.prepare import prepare
    from tunesmith.evaluate.evaluation import evaluate_run
    from tunesmith.methods.load import REWARD_FILE, load_model, reward_pooling
    from tunesmith.objectives.reward import score_pairs
    from tunesmith.objectives.rewards import RewardModelScorer, Rollouts

    cfg = tiny_cfg(tmp_path, tiny_model_dir, pairs_file, "task=reward", "method.name=full", "train.max_steps=12",
                   "train.lr=1e-3", "reward.pooling=mean")
    res = train(cfg)
    final = res.run_dir / "final"
    assert json.loads((final / REWARD_FILE).read_text()) == {"pooling": "mean"} and reward_pooling(final) == "mean"
    assert res.summary["after"]["eval_accuracy"] > 0.9
    tok_cfg = load_config(str(res.run_dir / "config.yaml"))
    plain = AutoModelForSequenceClassification.from_pretrained(final).eval()
    pair = prepare(tok_cfg.data, RewardModelScorer(str(res.run_dir), torch.device("cpu")).tokenizer).val.tokens[0]
    ids = torch.from_numpy(pair.input_ids).long()[None]
    answer = torch.from_numpy(pair.labels != -100)
    assert 0 < int(answer.sum()) < len(answer)
    with torch.no_grad():  # docs/methods.md: the head at every position, averaged over the answer's tokens
        per_token = plain.score(plain.model(input_ids=ids).last_hidden_state)[0, :, 0]
        by_hand, last = float(per_token[answer].mean()), float(per_token[-1])
    assert by_hand != pytest.approx(last, abs=1e-3)
    ours = score_pairs(load_model(final, torch.float32, torch.device("cpu")).eval(), [pair], plain.config.pad_token_id, "mean")
    assert float(ours[0, 0]) == pytest.approx(by_hand, abs=1e-4)
    # RL's scorer renders the conversation and answer as training did and finds the answer's tokens itself
    scorer = RewardModelScorer(str(res.run_dir), torch.device("cpu"))
    text = scorer.tokenizer.decode(pair.input_ids)
    user = text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
    reply = text.split("<|im_start|>assistant\n", 1)[1].split("<|im_end|>", 1)[0]
    rollouts = Rollouts(["p", "p"], [reply, ""], [[1], [1]], [[{"role": "user", "content": user}]] * 2, {})
    got = scorer(rollouts)
    assert got[0] == pytest.approx(by_hand, abs=1e-4)
    assert all(v == v for v in got)  # an empty answer is its end-of-turn tokens' score, not a division by zero
    # tunesmith eval reads the pooling from the saved run
    ev = evaluate_run(res.run_dir, data_path=str(pairs_file), n=10, log=lambda *a: None)
    assert ev["metrics"]["tuned"]["eval_accuracy"] > 0.9
    # exports carry it: the merged model beside its weights, the adapter export with a card that says how to load it
    from tunesmith.cli.main import main

    assert main(["export", str(res.run_dir), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert reward_pooling(tmp_path / "hf") == "mean"
    assert main(["export", str(res.run_dir), "--format", "adapter", "--out", str(tmp_path / "ad")]) == 0
    card = (tmp_path / "ad" / "README.md").read_text()
    assert "AutoModelForSequenceClassification.from_pretrained('<this folder>', num_labels=1)" in card
    assert "per-token scores over the answer's tokens" in card and reward_pooling(tmp_path / "ad") == "mean"
    (final / REWARD_FILE).unlink()  # a run without the file is read at the last token
    assert RewardModelScorer(str(res.run_dir), torch.device("cpu"))(rollouts)[0] != pytest.approx(by_hand, abs=1e-4)


def test_mean_pooling_on_the_models_own_forward_equals_the_shared_prefix_path(monkeypatch):
    """The path FSDP and prompt learning take (the model's forward, the head's per-token scores caught on the way) gives
    the mean the shared-prefix path gives, and an encoder, whose head reads the whole sequence, is refused."""
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    from tunesmith.errors import TunesmithError
    from tunesmith.models import heads

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, num_labels=1, pad_token_id=0)
    model = LlamaForSequenceClassification(config).eval()
    prompt = torch.randint(3, 300, (40,))
    ids = torch.zeros(2, 49, dtype=torch.long)
    ids[0] = torch.cat([prompt, torch.randint(3, 300, (9,))])
    ids[1, :45] = torch.cat([prompt, torch.randint(3, 300, (5,))])
    answers = torch.zeros(2, 49, dtype=torch.bool)
    answers[0, 40:49], answers[1, 40:45] = True, True
    with torch.no_grad():
        shared = heads.sequence_scores(model, ids, 0, answers)[:, 0]
        per_token = model.score(model.model(input_ids=ids[1:, :45]).last_hidden_state)[0, 40:45, 0]
        monkeypatch.setattr(heads, "_is_fsdp", lambda m: True)  # the path FSDP takes, on one process
        forward = heads.sequence_scores(model, ids, 0, answers)[:, 0]
    assert float(shared[1]) == pytest.approx(float(per_token.mean()), abs=1e-5)
    assert forward.tolist() == pytest.approx(shared.tolist(), abs=1e-5)
    encoder = BertForSequenceClassification(BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                       intermediate_size=64, num_labels=1)).eval()
    with pytest.raises(TunesmithError, match="reward.pooling: last"):
        heads.sequence_scores(encoder, ids, 0, answers)


def test_eval_completing_a_reward_run_with_its_best_weights_keeps_where_its_score_is_read(
        tmp_path, tiny_model_dir, pairs_file, monkeypatch):
    """`tunesmith eval` completing an interrupted closing evaluation publishes final/ again when it finishes with the
    best evaluation's weights: the folder it writes is the one training writes, the reward model's pooling included."""
    import os
    import signal

    from tunesmith.evaluate import closing
    from tunesmith.evaluate.evaluation import evaluate_run
    from tunesmith.methods.load import reward_pooling
    from tunesmith.train import loop
    from tunesmith.train.interrupt import TrainingInterrupted

    cfg = tiny_cfg(tmp_path, tiny_model_dir, pairs_file, "task=reward", "method.name=full", "train.max_steps=4",
                   "reward.pooling=mean", "eval.every_steps=2", "train.select_best=eval_accuracy")
    real_close = loop.close

    def sigterm_then_close(*a, **kw):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives as the closing evaluation starts
        return real_close(*a, **kw)

    monkeypatch.setattr(loop, "close", sigterm_then_close)
    with pytest.raises(TrainingInterrupted, match="closing evaluation"):
        train(cfg)
    final = tmp_path / "runs" / "t" / "final"
    assert reward_pooling(final) == "mean"
    monkeypatch.undo()
    monkeypatch.setattr(closing, "improves", lambda *a: False)  # the best evaluation's weights beat the last step's
    evaluate_run(final.parent, n=4, log=lambda *_: None)
    assert json.loads((final.parent / "eval.json").read_text())["state"] == "finished"
    assert reward_pooling(final) == "mean"
