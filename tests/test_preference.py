"""DPO: the loss and its gradients equal a straightforward reference implementation; training on
pairs raises held-out preference accuracy; it works from a base model and after SFT."""
import json

import pytest
import torch
import torch.nn.functional as F

from tunesmith.objectives.preference import dpo_losses, dpo_sum_loss, reference_free_losses, sequence_logprobs
from tunesmith.evaluate.evaluation import _paired_counts, evaluate_run
from tunesmith.train.loop import train
from tunesmith.errors import TunesmithError
from conftest import write_jsonl
from test_train import tiny_cfg


def plain_logprobs(model, ids, labels):
    logits = model(input_ids=ids).logits[:, :-1].float()
    tgt = labels[:, 1:]
    logp = logits.log_softmax(-1).gather(-1, tgt.clamp(min=0)[..., None]).squeeze(-1)
    return (logp * (tgt != -100)).sum(-1)


def tiny_model_and_pairs(tiny_model_dir, seed: int, short_row: int, short_end: int):
    """A tiny model and 2 random pairs (chosen rows 0-1, rejected rows 2-3): prompt = the first 5 tokens,
    row `short_row` ends its answer at `short_end`; random reference log-probs."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(seed)
    ids = torch.randint(3, 200, (4, 12))
    labels = ids.clone()
    labels[:, :5] = -100
    labels[short_row, short_end:] = -100
    return model, ids, labels, torch.randn(2, 2, dtype=torch.float64)


def test_dpo_loss_and_gradients_match_a_plain_implementation(tiny_model_dir):
    model, ids, labels, ref = tiny_model_and_pairs(tiny_model_dir, seed=0, short_row=1, short_end=9)
    beta = 0.3
    ours = sequence_logprobs(model, ids, labels)
    plain = plain_logprobs(model, ids, labels)
    assert torch.allclose(ours, plain, atol=1e-5)
    for kind, ls in (("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0), ("hinge", 0.0)):
        model.zero_grad()
        loss = dpo_losses(ours[:2], ours[2:], ref[:, 0].float(), ref[:, 1].float(), beta, kind, ls).sum()
        g1 = torch.autograd.grad(loss, model.model.layers[0].mlp.up_proj.weight, retain_graph=True)[0]
        h = (plain[:2] - ref[:, 0].float()) - (plain[2:] - ref[:, 1].float())
        if kind == "sigmoid":
            manual = (-(1 - ls) * F.logsigmoid(beta * h) - ls * F.logsigmoid(-beta * h)).sum()
        elif kind == "ipo":
            manual = ((h - 1 / (2 * beta)) ** 2).sum()
        else:
            manual = torch.relu(1 - beta * h).sum()
        g2 = torch.autograd.grad(manual, model.model.layers[0].mlp.up_proj.weight, retain_graph=True)[0]
        assert torch.allclose(loss, manual, atol=1e-5), kind
        assert torch.allclose(g1, g2, atol=1e-5), kind


def test_sft_weight_adds_the_chosen_answers_per_token_nll(tiny_model_dir):
    from types import SimpleNamespace

    model, ids, labels, ref = tiny_model_and_pairs(tiny_model_dir, seed=1, short_row=0, short_end=8)  # chosen: 3 and 7 tokens
    batch = SimpleNamespace(input_ids=ids, labels=labels)
    cfg = SimpleNamespace(beta=0.2, loss="sigmoid", label_smoothing=0.0, sft_weight=0.7)
    plain = plain_logprobs(model, ids, labels)
    dpo = dpo_losses(plain[:2], plain[2:], ref[:, 0].float(), ref[:, 1].float(), 0.2).sum()
    nll_per_token = -plain[:2] / torch.tensor([3.0, 7.0])
    assert torch.allclose(dpo_sum_loss(model, batch, ref, cfg), dpo + 0.7 * nll_per_token.sum(), atol=1e-5)
    assert torch.allclose(dpo_sum_loss(model, batch, ref, SimpleNamespace(**{**vars(cfg), "sft_weight": 0.0})), dpo, atol=1e-5)


def test_simpo_and_orpo_losses_and_gradients_match_the_papers_formulas(tiny_model_dir):
    from types import SimpleNamespace

    model, ids, labels, _ = tiny_model_and_pairs(tiny_model_dir, seed=2, short_row=3, short_end=8)  # rejected: 7 and 3 tokens
    ours = sequence_logprobs(model, ids, labels)
    plain = plain_logprobs(model, ids, labels)
    n = torch.tensor([7.0, 7.0, 7.0, 3.0])  # trained tokens per row
    mean = plain / n
    weight = model.model.layers[0].mlp.up_proj.weight
    for kind, beta in (("simpo", 2.0), ("orpo", 0.3)):
        loss = reference_free_losses(ours[:2], ours[2:], n[:2], n[2:], beta, kind, gamma=0.5).sum()
        if kind == "simpo":
            manual = -torch.log(torch.sigmoid(beta * (mean[:2] - mean[2:]) - 0.5)).sum()
        else:  # odds = p / (1 - p) of p = the geometric-mean token probability
            p = mean.exp()
            ratio = torch.log(p[:2] / (1 - p[:2])) - torch.log(p[2:] / (1 - p[2:]))
            manual = (-mean[:2] - beta * torch.log(torch.sigmoid(ratio))).sum()
        g1 = torch.autograd.grad(loss, weight, retain_graph=True)[0]
        g2 = torch.autograd.grad(manual, weight, retain_graph=True)[0]
        assert torch.allclose(loss, manual, atol=1e-5), kind
        assert torch.allclose(g1, g2, atol=1e-5), kind
        cfg = SimpleNamespace(beta=beta, loss=kind, simpo_gamma=0.5, sft_weight=0.0, label_smoothing=0.0)
        batch = SimpleNamespace(input_ids=ids, labels=labels)
        assert torch.allclose(dpo_sum_loss(model, batch, None, cfg), manual, atol=1e-5), kind  # counts from the labels
    # an answer the model is certain of (mean log-prob 0): the odds are huge, not infinite
    certain = reference_free_losses(torch.zeros(1), torch.full((1,), -3.0), torch.ones(1), torch.ones(1), 0.1, "orpo")
    assert torch.isfinite(certain).all()


@pytest.fixture
def pairs_file(tmp_path):
    rows = [{"prompt": f"Is {i} a nice number?", "chosen": f"Yes, {i} is a fine number.", "rejected": "No. Go away."}
            for i in range(48)]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_dpo_raises_heldout_preference_accuracy(tmp_path, tiny_model_dir, pairs_file, method):
    res = train(tiny_cfg(tmp_path, tiny_model_dir, pairs_file, f"method.name={method}", "train.max_steps=12",
                         "train.lr=" + ("1e-2" if method == "lora" else "1e-3"), "dpo.beta=0.5"))
    s = res.summary
    assert s["task"] == "dpo"
    assert s["before"]["eval_reward_accuracy"] == 0.5 and s["before"]["eval_reward_margin"] == 0  # policy == reference
    assert s["after"]["eval_reward_accuracy"] > 0.9 and s["after"]["eval_reward_margin"] > 0
    assert s["after"]["eval_logp_accuracy"] >= s["before"]["eval_logp_accuracy"]
    # `tunesmith eval` of the run on the same held-out pairs: base and tuned scored side by side give the
    # numbers training logged before and after (the base is the DPO reference)
    ev = evaluate_run(res.run_dir, n=10_000, log=lambda *_: None)
    base, tuned = ev["metrics"]["base"], ev["metrics"]["tuned"]
    assert ev["examples"] == tuned["eval_pairs"] == s["after"]["eval_pairs"]
    for k in ("eval_reward_accuracy", "eval_reward_margin", "eval_loss", "eval_logp_accuracy", "eval_seq_logp_accuracy"):
        assert tuned[k] == pytest.approx(s["after"][k], rel=5e-3, abs=1e-3), k  # merged weights: ~1e-3 apart
    assert base["eval_logp_accuracy"] == pytest.approx(s["before"]["eval_logp_accuracy"])
    for k, counts in ev["against_base"].items():
        assert counts["won"] - counts["lost"] == round((tuned[k] - base[k]) * tuned["eval_pairs"]), k


def test_preference_eval_scores_other_runs_and_refuses_one_with_another_tokenizer(tmp_path, tiny_model_dir, pairs_file):
    import shutil
    from transformers import AutoTokenizer

    run = train(tiny_cfg(tmp_path, tiny_model_dir, pairs_file, "train.max_steps=3", "output.name=dpo")).run_dir
    same = shutil.copytree(run, tmp_path / "runs" / "same")
    ev = evaluate_run(run, n=10_000, other_runs=(same,), with_base=False, log=lambda *_: None)
    assert ev["metrics"]["same"] == ev["metrics"]["tuned"]
    other = shutil.copytree(run, tmp_path / "runs" / "other")
    tok = AutoTokenizer.from_pretrained(other / "final")
    tok.add_tokens(["<brand-new-token>"])
    tok.save_pretrained(other / "final")
    with pytest.raises(TunesmithError, match="--runs .*other: its tokenizer differs"):
        evaluate_run(run, n=10_000, other_runs=(other,), with_base=False, log=lambda *_: None)


@pytest.mark.parametrize("kind", ["simpo", "orpo"])
def test_reference_free_losses_train_without_a_reference_pass(tmp_path, tiny_model_dir, pairs_file, monkeypatch, kind):
    from tunesmith.objectives.preference import Preference

    def no_reference(*a, **kw):
        raise AssertionError("a reference-free loss computed reference log-probs")

    monkeypatch.setattr(Preference, "pass_reference", no_reference)
    monkeypatch.setattr(Preference, "reference_pass", no_reference)
    res = train(tiny_cfg(tmp_path, tiny_model_dir, pairs_file, "train.max_steps=12", f"dpo.loss={kind}", "dpo.sft_weight=0"))
    before, after = res.summary["before"], res.summary["after"]
    assert after["eval_loss"] < before["eval_loss"]
    assert after["eval_logp_accuracy"] > 0.9 >= before["eval_logp_accuracy"]  # the chosen answer now likelier per token
    assert after["eval_reward_accuracy"] == after["eval_logp_accuracy"]  # the reward is beta x the mean log-prob
    ev = evaluate_run(res.run_dir, n=10_000, log=lambda *_: None)
    assert ev["metrics"]["tuned"]["eval_loss"] == pytest.approx(after["eval_loss"], rel=5e-3)
    assert ev["metrics"]["base"]["eval_loss"] == pytest.approx(before["eval_loss"], rel=5e-3)


def test_orpo_refuses_an_extra_sft_weight():
    from tunesmith.config import load_config

    with pytest.raises(TunesmithError, match="orpo already has"):
        load_config(None, ["dpo.loss=orpo", "dpo.sft_weight=1"])


def test_dpo_after_sft_starts_from_the_tuned_run(tmp_path, tiny_model_dir, instruction_file, pairs_file):
    sft = train(tiny_cfg(tmp_path, tiny_model_dir, instruction_file, "train.max_steps=4", "output.name=sft")).run_dir
    dpo = train(tiny_cfg(tmp_path, str(sft), pairs_file, "train.max_steps=4", "output.name=dpo", "train.lr=1e-2")).run_dir
    config = json.loads((dpo / "final" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(sft / "final")
    from tunesmith.methods.load import load_model
    model = load_model(dpo / "final", torch.float32, torch.device("cpu"))  # SFT merged, DPO adapter on top
    assert model(input_ids=torch.tensor([[1, 5, 9]])).logits.shape[-1] > 0


def test_dpo_step_loss_is_the_mean_over_pairs(tmp_path, tiny_model_dir, pairs_file):
    """Before any update the policy equals the reference, so the DPO loss of every pair is log 2."""
    import math
    s = train(tiny_cfg(tmp_path, tiny_model_dir, pairs_file, "train.max_steps=1", "train.lr=1e-9")).summary
    first = json.loads((tmp_path / "runs" / "t" / "metrics.jsonl").read_text().splitlines()[1])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-3), first
    assert s["task"] == "dpo"


def test_sign_test_p_values_by_hand():
    both = torch.tensor([True, False])
    assert _paired_counts(both, both) == {"won": 0, "lost": 0, "p_value": 1.0}
    base, tuned = torch.zeros(8, dtype=torch.bool), torch.ones(8, dtype=torch.bool)
    assert _paired_counts(base, tuned) == {"won": 8, "lost": 0, "p_value": round(2 / 2 ** 8, 4)}
    tuned[:2] = False  # 6 won, 0 lost; then one pair only the base gets right: 6 / 1, p = 2 * (1 + 7) / 128
    base[0] = True
    assert _paired_counts(base, tuned) == {"won": 6, "lost": 1, "p_value": 0.125}
