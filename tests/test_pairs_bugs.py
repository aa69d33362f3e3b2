"""Preference pairs from tuned runs and text templates: a reward model and a classifier start from an adapter (LoRA)
run -- its adapter merged into the base, a fresh score head on top; text templates render preference pairs as they
render a supervised record with no input; a judgements file's dropped ties and unusable lines are in the data stats
the run records."""
import json

import pytest
import torch

from conftest import write_jsonl
from test_train import tiny_cfg
from tunesmith.train.loop import train


@pytest.fixture
def pairs_file(tmp_path):
    rows = [{"prompt": f"Is {i} a nice number?", "chosen": f"Yes, {i} is a fine number.", "rejected": "No. Go away."}
            for i in range(48)]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def sft_run(tmp_path, tiny_model_dir, instruction_file, method: str):
    """A tiny supervised run whose method moved the weights (lr 1e-2)."""
    return train(tiny_cfg(tmp_path, tiny_model_dir, instruction_file, f"method.name={method}", "train.max_steps=3",
                          "eval.samples=0", "output.name=parent")).run_dir


@pytest.fixture
def lora_parent(tmp_path, tiny_model_dir, instruction_file):
    return sft_run(tmp_path, tiny_model_dir, instruction_file, "lora")


def backbone_states(model, ids):
    """The last hidden states of a model's backbone (the part a causal LM and a sequence classifier share)."""
    with torch.no_grad():
        return model.base_model(input_ids=ids).last_hidden_state


@pytest.mark.parametrize("method", ["lora", "adapters"])  # a peft adapter; a partial method's tensors (also bitfit)
@pytest.mark.parametrize("task,labels", [("reward", None), ("classification", ["no", "yes", "maybe"])])
def test_a_score_model_loaded_from_a_tuned_run_has_its_weights_under_a_fresh_head(tmp_path, tiny_model_dir,
                                                                                  instruction_file, method, task, labels):
    from transformers import AutoModelForCausalLM

    from tunesmith.methods.load import load_model, merge_adapter

    parent = sft_run(tmp_path, tiny_model_dir, instruction_file, method)
    cpu = torch.device("cpu")
    tuned = merge_adapter(load_model(parent / "final", torch.float32, cpu)).eval()  # the parent as it generates
    model = load_model(parent / "final", torch.float32, cpu, task, labels=labels).eval()
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.num_labels == (1 if task == "reward" else 3)
    if labels:
        assert [model.config.id2label[i] for i in range(3)] == labels
    ids = torch.tensor([[1, 5, 9, 40, 7]])
    ours = backbone_states(model, ids)
    assert torch.allclose(ours, backbone_states(tuned, ids), atol=1e-5)  # the adapter is in the weights
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert not torch.allclose(ours, backbone_states(base, ids), atol=1e-3)  # ... and it moved them
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (1, model.config.num_labels)
    assert model.name_or_path == str(parent / "final")  # what a new adapter on it names as its base


def test_an_adapter_on_a_partial_method_run_names_that_run_as_its_base(tmp_path, tiny_model_dir, instruction_file,
                                                                       pairs_file):
    """Was: a LoRA child of a bottleneck-adapters (or BitFit) run named the base model, so loading the child left out
    its parent's tensors."""
    from tunesmith.methods.load import load_model

    parent = sft_run(tmp_path, tiny_model_dir, instruction_file, "adapters")
    child = train(tiny_cfg(tmp_path, str(parent), pairs_file, "task=dpo", "method.name=lora", "train.max_steps=1",
                           "eval.samples=0", "output.name=child")).run_dir
    config = json.loads((child / "final" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(parent / "final")
    loaded = load_model(child / "final", torch.float32, torch.device("cpu"))
    assert sum(type(m).__name__ == "Bottleneck" for m in loaded.modules()) == 2  # the parent's, one per block


def test_reward_model_trains_from_an_adapter_run(tmp_path, lora_parent, pairs_file):
    """Was: `score_pairs` crashed ("only one element tensors can be converted to Python scalars"): the parent's
    adapter was loaded on a causal LM, whose vocabulary logits were read as the score."""
    res = train(tiny_cfg(tmp_path, str(lora_parent), pairs_file, "task=reward", "method.name=lora", "train.max_steps=16",
                         "eval.samples=0", "output.name=rm"))
    s = res.summary
    assert s["task"] == "reward"
    assert s["after"]["eval_accuracy"] > 0.9 and s["after"]["eval_loss"] < s["before"]["eval_loss"]
    config = json.loads((res.run_dir / "final" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["base_model_name_or_path"] == str(lora_parent / "final")
    # reloaded (the parent merged, the reward adapter and its head on top), it scores the held-out pairs as training did
    from tunesmith.evaluate.evaluation import evaluate_run

    ev = evaluate_run(res.run_dir, n=10_000, log=lambda *a: None)
    tuned = ev["metrics"]["tuned"]
    assert tuned["eval_pairs"] == s["after"]["eval_pairs"]
    assert tuned["eval_accuracy"] == pytest.approx(s["after"]["eval_accuracy"])
    assert tuned["eval_loss"] == pytest.approx(s["after"]["eval_loss"], rel=1e-3, abs=1e-4)


def test_a_prompt_tuning_run_cannot_start_a_reward_model(tmp_path, tiny_model_dir, instruction_file):
    from tunesmith.errors import TunesmithError
    from tunesmith.methods.load import load_model

    run = train(tiny_cfg(tmp_path, tiny_model_dir, instruction_file, "method.name=prompt-tuning", "train.max_steps=1",
                         "eval.samples=0", "output.name=soft")).run_dir
    with pytest.raises(TunesmithError, match="prompt-tuning run cannot start a reward model"):
        load_model(run / "final", torch.float32, torch.device("cpu"), "reward")


@pytest.mark.parametrize("template,sft_fields", [("alpaca", ("instruction", "output")), ("qa", ("instruction", "output")),
                                                  ("instruct", ("instruction", "output")),
                                                  ("{prompt} => {completion}", ("prompt", "completion"))])
def test_text_templates_render_each_side_of_a_pair_as_a_supervised_record_with_no_input(tmp_path, tiny_tokenizer,
                                                                                       template, sft_fields):
    """Was: every pair failed with "data.template uses {input} but the record has fields: instruction, output"."""
    from collections import Counter

    from tunesmith.config import load_config
    from tunesmith.data.prepare import load_examples, tokenize_pairs, tokenize_split

    pairs = [{"prompt": f"Is {i} a nice number?", "chosen": f"Yes, {i} is fine.", "rejected": "No."} for i in range(4)]
    prompt_key, answer_key = sft_fields
    sides = {side: write_jsonl(tmp_path / f"{side}.jsonl", [{prompt_key: p["prompt"], answer_key: p[side]} for p in pairs])
             for side in ("chosen", "rejected")}
    cfg = load_config(None, [f"data.path={write_jsonl(tmp_path / 'pairs.jsonl', pairs)}", f"data.template={json.dumps(template)}"]).data
    fmt, examples, _ = load_examples(cfg, cfg.path)
    assert fmt == "preference"
    got = tokenize_pairs(examples, cfg, tiny_tokenizer, 256, Counter())
    assert len(got.tokens) == 4
    for side in ("chosen", "rejected"):
        fmt, records, _ = load_examples(cfg, str(sides[side]))
        assert fmt in ("instruction", "prompt_completion")
        sft = tokenize_split(records, cfg, tiny_tokenizer, 256, Counter())
        for pair, record in zip(got.tokens, sft.tokens):
            ours = pair if side == "chosen" else pair.rejected
            assert ours.input_ids.tolist() == record.input_ids.tolist()
            assert ours.labels.tolist() == record.labels.tolist()
    assert [r.text for r in got.rendered] == [r.text for r in tokenize_split(
        load_examples(cfg, str(sides["chosen"]))[1], cfg, tiny_tokenizer, 256, Counter()).rendered]
    if template == "qa":  # no input: the optional part is left out, not rendered empty
        assert got.rendered[0].prompt == "Question: Is 0 a nice number?\nAnswer: "


def test_a_judgements_files_dropped_lines_are_in_the_data_stats_the_run_records(tmp_path, tiny_model_dir):
    """Was: the counts of ties and unusable lines went to stderr before the run log opened; the run recorded only the
    pairs."""
    rows = [{"prompt": [{"role": "user", "content": f"Is {i} a nice number?"}], "a": "base", "b": "run",
             "answer_a": f"Yes, {i} is.", "answer_b": "No.", "winner": "ab"[i % 2]} for i in range(22)]
    rows[3]["winner"] = rows[7]["winner"] = "tie"
    rows[5]["answer_b"] = rows[5]["answer_a"]  # two identical answers
    judged = write_jsonl(tmp_path / "judgements.jsonl", rows)
    with open(judged, "a") as fh:
        fh.write('{"prompt": "torn by a cra')  # line 23
    res = train(tiny_cfg(tmp_path, tiny_model_dir, judged, "task=dpo", "train.max_steps=1", "eval.samples=0",
                         "data.val_size=4"))
    expected = {"file": str(judged), "judgements": 23, "pairs": 19, "dropped_ties": 2, "dropped_identical": 1,
                "dropped_unusable": 1}
    for recorded in (res.summary["data"], json.loads((res.run_dir / "eval.json").read_text())["data"]):
        assert recorded["records"] == 19
        [got] = recorded["judgements"]
        assert {k: got[k] for k in expected} == expected
        [torn] = got["unusable_samples"]
        assert torn.startswith(f"{judged}:23: not valid JSON (Unterminated string")
