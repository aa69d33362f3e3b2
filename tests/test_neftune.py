"""NEFTune (`train.neftune_noise_alpha`): noisy input embeddings while training, clean ones otherwise. Label smoothing
(`train.label_smoothing`), the other training-only regulariser, shares the end-to-end checks."""
import json
import math

import pytest
import torch

from tunesmith.config import load_config, check_combinations
from tunesmith.errors import TunesmithError
from tunesmith.models import heads as loss_mod
from tunesmith.models import neftune
from tunesmith.train.loop import train
from conftest import make_tiny_llama
from test_train import tiny_cfg


def test_noise_is_bounded_and_only_there_while_training():
    model = make_tiny_llama(120)
    ids = torch.randint(3, 120, (3, 40))
    clean = model.get_input_embeddings().weight[ids].detach()
    remove = neftune.add_noise(model, 5.0)
    model.train()
    noise = model.get_input_embeddings()(ids).detach() - clean
    bound = 5.0 / math.sqrt(40 * 32)
    assert 0.9 * bound < noise.abs().max() <= bound  # uniform in [-bound, bound]
    assert noise.std() > bound / 3  # spread over the interval, not a few outliers (uniform: bound / sqrt(3))
    model.eval()
    assert torch.equal(model.get_input_embeddings()(ids), clean)
    model.train()
    remove()
    assert torch.equal(model.get_input_embeddings()(ids), clean)
    assert not neftune.is_on(model.model)


def test_rows_with_a_shared_prefix_each_get_their_own_noise():
    """The shared-prefix shortcut would run the prefix once, so every row would carry the same noise there."""
    model = make_tiny_llama(120)
    ids = torch.randint(3, 120, (1, 100)).repeat(4, 1)
    ids[:, -1] = torch.arange(4) + 3  # rows share 99 tokens
    calls = []
    model.model.register_forward_hook(lambda *a: calls.append(1))
    neftune.add_noise(model, 5.0)
    model.train()
    hidden = loss_mod._backbone_hidden(model.model, ids)
    assert len(calls) == 1  # every row run whole
    assert not torch.allclose(hidden[0, :10], hidden[1, :10])
    model.eval()  # evaluation is clean, so the shortcut is back
    with torch.no_grad():
        loss_mod._backbone_hidden(model.model, ids)
    assert len(calls) == 3


@pytest.mark.parametrize("option", ["train.neftune_noise_alpha=15", "train.label_smoothing=0.1"])
@pytest.mark.parametrize("task, method", [("causal", "lora"), ("causal", "full"), ("classification", "lora")])
def test_training_with_noise_evaluates_clean(tmp_path, tiny_model_dir, tiny_bert_dir, instruction_file, sentiment_file,
                                             task, method, option):
    model, data = (tiny_model_dir, instruction_file) if task == "causal" else (tiny_bert_dir, sentiment_file)
    runs = {}
    for name, extra in (("plain", []), ("noisy", [option])):
        res = train(tiny_cfg(tmp_path, model, data, "train.max_steps=4", f"method.name={method}", f"output.name={name}", *extra))
        assert res.summary["task"] == task
        rows = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
        runs[name] = res.summary["before"], [r["loss"] for r in rows if "loss" in r]
    assert runs["plain"][0] == runs["noisy"][0]  # the held-out split before training: clean embeddings, plain CE
    assert runs["plain"][1][0] != runs["noisy"][1][0]  # the first step's training loss: noisy / smoothed
    assert all(math.isfinite(x) for x in runs["noisy"][1])


def test_noise_is_refused_for_preference_tuning():
    cfg = load_config(None, ["train.neftune_noise_alpha=5"])
    with pytest.raises(TunesmithError, match="neftune_noise_alpha.*task=dpo"):
        check_combinations(cfg, "dpo")
    check_combinations(cfg, "causal")


def test_label_smoothing_is_refused_where_targets_are_not_one_hot():
    cfg = load_config(None, ["train.label_smoothing=0.1"])
    check_combinations(cfg, "causal")
    check_combinations(cfg, "classification")
    with pytest.raises(TunesmithError, match="label_smoothing.*not one-hot"):
        check_combinations(cfg, "dpo")
    with pytest.raises(TunesmithError, match="label_smoothing.*not one-hot"):
        check_combinations(load_config(None, ["train.label_smoothing=0.1", "distill.teacher=x"]), "causal")
    check_combinations(load_config(None, ["train.label_smoothing=0.1", "distill.teacher=x", "distill.mode=sequence"]), "causal")
