"""Every objective through the same checks, outside the training loop (PEFT's battery style): a pass's loss is finite
and its gradients reach trainable parameters only; a step's weights count something; measuring leaves the model as
it was; samples, descriptions and results have their shape."""
import math

import pytest
import torch

from tunesmith.assemble import assemble
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
}


@pytest.fixture
def pairs_file(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Say {i}.", "chosen": f"{i} {i}.", "rejected": f"no {i + 3} never."}
                                                  for i in range(24)])


@pytest.mark.parametrize("case", list(CASES))
def test_every_objective_has_the_same_shape(case, tmp_path, tiny_model_dir, tiny_bert_dir, instruction_file, sentiment_file,
                                           pairs_file):
    kind, extra = CASES[case]
    model_dir = tiny_bert_dir if kind == "sentiment" else tiny_model_dir
    data = {"instruction": instruction_file, "sentiment": sentiment_file, "pairs": pairs_file}[kind]
    cfg = tiny_cfg(tmp_path, model_dir, data, *[e.format(model=model_dir) for e in extra])
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
    assert math.isfinite(before["eval_loss"]) and objective.measure(model, objective.val) == before
    assert isinstance(objective.describe(before), str)
    assert all(isinstance(line, str) for line in objective.results(before, before))
    outputs = objective.samples(model, [0, 1])
    assert len(outputs) == 2 and all(isinstance(o.text, str) for o in outputs)
    if objective.teacher is not None or case.startswith("distill"):
        assert objective.teacher_metrics and math.isfinite(objective.teacher_metrics["eval_loss"])
