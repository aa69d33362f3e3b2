"""Every objective through the same checks, outside the training loop (PEFT's battery style): a pass's loss is finite
and its gradients reach trainable parameters only; a step's weights count something; measuring leaves the model as
it was; samples, descriptions and results have their shape; every task's objective measures the headline metric and the
verdict's metric its task declares (catalog.TaskShows)."""
import math

import pytest
import torch

from tunesmith.assemble import assemble
from tunesmith.catalog import TASKS
from tunesmith.data.batching import collate
from tunesmith.objectives import Context, objective_for
from conftest import write_jsonl
from test_train import tiny_cfg

CASES = {
    "sft": ("instruction", []),
    "classification": ("sentiment", []),
    "preference": ("pairs", []),
    "preference-simpo": ("pairs", ["dpo.loss=simpo"]),
    "distill-logits": ("instruction", ["distill.teacher={model}"]),
    "distill-top-k": ("instruction", ["distill.teacher={model}", "distill.top_k=4"]),
    "distill-sequence": ("instruction", ["distill.teacher={model}", "distill.mode=sequence"]),
    "distill-classification": ("sentiment", ["distill.teacher={model}"]),
    "reward": ("pairs", ["task=reward"]),
    "rl": ("prompts", ["task=rl", "rl.group_size=4", "rl.max_new_tokens=8", "rl.headroom_samples=0", "{vowels}"]),
}
VOWELS = """
def vowels(prompts, completions, completion_ids, **kwargs):  # the random tiny model's text varies by its token ids
    return [sum(ch in "aeiou" for ch in c) / max(1, len(c)) + sum(ids) % 7 / 7 for c, ids in zip(completions, completion_ids)]
"""


def test_the_battery_runs_every_task():
    tasks = {e.split("=", 1)[1] for _, extra in CASES.values() for e in extra if e.startswith("task=")}
    assert set(TASKS) <= tasks | {"causal", "classification", "dpo"}  # sft, classification, preference: by their data


@pytest.fixture
def pairs_file(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Say {i}.", "chosen": f"{i} {i}.", "rejected": f"no {i + 3} never."}
                                                  for i in range(24)])


@pytest.fixture
def prompts_file(tmp_path):
    (tmp_path / "vowels.py").write_text(VOWELS)
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Say something about {i}.", "answer": str(i)} for i in range(24)])


@pytest.mark.parametrize("case", list(CASES))
def test_every_objective_has_the_same_shape(case, tmp_path, tiny_model_dir, tiny_bert_dir, instruction_file, sentiment_file,
                                           pairs_file, prompts_file):
    kind, extra = CASES[case]
    model_dir = tiny_bert_dir if kind == "sentiment" else tiny_model_dir
    data = {"instruction": instruction_file, "sentiment": sentiment_file, "pairs": pairs_file, "prompts": prompts_file}[kind]
    vowels = f"rl.rewards=[{{kind: function, path: {tmp_path / 'vowels.py'}:vowels}}]"
    cfg = tiny_cfg(tmp_path, model_dir, data, *[e.format(model=model_dir, vowels=vowels) for e in extra])
    device = torch.device("cpu")
    run = assemble(cfg, device, keep_text="distill.mode=sequence" in extra)
    model = run.model
    objective = objective_for(run.task, cfg, run.data, run.tokenizer, run.precision.dtype)
    ctx = Context(device, log=lambda *_: None, measure=lambda m: objective.measure(m, objective.val),
                  cache_dir=tmp_path / "cache", batch_tokens=cfg.train.batch_tokens)
    objective.load(ctx, examples_needed=len(objective.train))
    objective.prepare(model, ctx)

    weights = [objective.weight(t) for t in objective.train]
    assert weights and all(isinstance(w, int) and w > 0 for w in weights)
    per_pass = objective.examples_per_pass or cfg.train.micro_batch_size
    examples = list(range(min(per_pass, len(objective.train))))
    batch = collate([objective.train[i] for i in examples], objective.pad_id, device)
    model.train()
    objective.begin_step(model, examples, 0)  # online RL samples its rollouts here
    loss = objective.loss(model, batch, examples)
    assert loss.dim() == 0 and math.isfinite(float(loss))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads and set(grads) <= trainable
    assert any(float(g.abs().sum()) > 0 for g in grads.values())
    model.zero_grad(set_to_none=True)

    before = objective.measure(model, objective.val)
    assert model.training  # measuring gives the model back as it found it
    shows = TASKS[run.task].shows
    key = "eval_loss" if "eval_loss" in TASKS[run.task].metrics else shows.headline  # RL measures rewards, no loss
    assert math.isfinite(before[key]) and objective.measure(model, objective.val) == before
    assert math.isfinite(before[shows.headline]) and math.isfinite(before[shows.verdict.metric])  # what the task declares
    assert isinstance(objective.describe(before), str)
    assert all(isinstance(line, str) for line in objective.results(before, before))
    outputs = objective.samples(model, [0, 1])
    assert len(outputs) == 2 and all(isinstance(o.text, str) for o in outputs)
    if objective.teacher is not None or case.startswith("distill"):
        assert objective.teacher_metrics and math.isfinite(objective.teacher_metrics["eval_loss"])
