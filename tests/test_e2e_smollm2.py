"""End to end with the real bundled SmolLM2 weights: a handful of steps through the CLI."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import write_jsonl

pytestmark = pytest.mark.slow


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "tunesmith.cli.main", *args], cwd=cwd, capture_output=True, text=True, timeout=900)


def test_default_recipe_trains_saves_and_generates(tmp_path):
    p = run_cli("train", "train.max_steps=3", "eval.max_examples=8", "eval.samples=1", "eval.max_new_tokens=8",
                "output.name=e2e", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout + p.stderr
    assert "trainable" in out and "held-out loss on responses" in out and "saved:" in out
    run = tmp_path / "runs" / "e2e"
    summary = json.loads((run / "eval.json").read_text())
    assert summary["data"]["format"] == "instruction" and summary["steps"] == 3
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    # the same name again is refused without --overwrite, with a one-line error
    again = run_cli("train", "train.max_steps=1", "output.name=e2e", cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    g = run_cli("generate", "--run", str(run), "Summarize what `len` does.", "--max-new-tokens", "12", cwd=tmp_path)
    assert g.returncode == 0 and g.stdout.strip(), g.stderr[-2000:]
    # every command the run suggests as a next step works on the run that printed it
    import re
    import shlex
    hint = re.search(r"\(try: (.*)\)", out).group(1)
    suggested = [shlex.split(c.strip()) for c in hint.split(";")]
    assert [c[:2] for c in suggested] == [["tunesmith", "generate"], ["tunesmith", "eval"]], suggested
    for cmd in suggested:
        args = [a if a != '...' else "Summarize what `len` does." for a in cmd[1:]]
        if args[0] == "eval":
            args += ["-n", "4", "--max-new-tokens", "8"]
        if args[0] == "generate":
            args += ["--max-new-tokens", "8"]
        done = run_cli(*args, cwd=tmp_path)
        assert done.returncode == 0, (cmd, done.stderr[-3000:])
    assert json.loads((run / "evaluation.json").read_text())["examples"] == 4


def test_plain_peft_loads_tunesmith_adapter_on_smollm2(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunesmith.config import load_config
    from tunesmith.methods.load import load_model
    from tunesmith.models import resolve_model_dir
    from tunesmith.train.loop import train

    cfg = load_config(None, ["train.max_steps=2", "eval.max_examples=4", "eval.samples=0", "data.max_examples=64",
                             f"output.dir={tmp_path}", "output.name=peft"])
    res = train(cfg)
    base_dir = resolve_model_dir("smollm2-135m-instruct")
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), res.run_dir / "final").eval()
    ours = load_model(res.run_dir / "final", torch.float32).eval()
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 30]])
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, plain(ids).logits, atol=1e-5)


@pytest.mark.parametrize("recipe", ["tldr", "kjv", "sentiment"])
def test_task_recipes_train_on_a_users_file_of_the_same_shape(recipe, tmp_path):
    """Each recipe's header names the fields a user's file needs; a file with only those fields trains and evaluates."""
    rows = {
        "tldr": [{"document": f"We study problem {i}. Our method improves results on benchmarks by a margin.",
                  "summary": f"A method for problem {i}."} for i in range(16)],
        "kjv": [{"instruction": "Rewrite in old style.", "input": f"You went to city {i}.",
                 "output": f"Thou wentest unto city {i}."} for i in range(16)],
        "sentiment": [{"text": f"Thing {i} is {'great' if i % 2 else 'awful'}.", "label": "good" if i % 2 else "bad"}
                      for i in range(24)],
    }[recipe]
    data = write_jsonl(tmp_path / "mine.jsonl", rows)
    p = run_cli("train", recipe, f"data.path={data}", "data.val_size=4", "train.max_steps=1", "train.max_minutes=null",
                "eval.max_examples=4", "eval.samples=1", "eval.max_new_tokens=8", "output.name=mine", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "runs" / "mine"
    summary = json.loads((run / "eval.json").read_text())
    assert summary["steps"] == 1 and summary["task"] == ("classification" if recipe == "sentiment" else "causal")
    if recipe == "sentiment":  # the head is built for the user's labels, not the recipe's
        assert "classification into 2 labels: bad" in p.stdout + p.stderr
    e = run_cli("eval", str(run), "--data", str(data), "-n", "4", "--no-base", "--max-new-tokens", "8", cwd=tmp_path)
    assert e.returncode == 0, e.stderr[-3000:]
    metrics = json.loads((run / "evaluation.json").read_text())["metrics"]["tuned"]
    assert ("eval_accuracy" if recipe == "sentiment" else "rougeL") in metrics


def test_studio_runs_openai_supervised_and_dpo_jobs_on_smollm2(tmp_path):
    """The OpenAI SDK against `tunesmith studio` on the bundled SmolLM2: an OpenAI chat JSONL (supervised) and an
    OpenAI DPO JSONL (dpo), queued behind each other, then chat with each job's fine_tuned_model."""
    from conftest import write_jsonl
    from test_studio import FAST, Running, chat_rows, dpo_rows, upload, wait

    s = Running(tmp_path / "home")
    try:
        c = s.client()
        sft = upload(c, write_jsonl(tmp_path / "chat.jsonl", chat_rows(24)))
        pairs = upload(c, write_jsonl(tmp_path / "dpo.jsonl", dpo_rows(16)))
        assert (sft.status, pairs.status) == ("processed", "processed")
        jobs = [c.fine_tuning.jobs.create(model="smollm2-135m-instruct", training_file=sft.id, suffix="say",
                                          hyperparameters={"n_epochs": 1, "batch_size": 8},
                                          extra_body={"tunesmith": {"overrides": FAST[:-1]}}),
                c.fine_tuning.jobs.create(model="smollm2-135m-instruct", training_file=pairs.id,
                                          method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "batch_size": 8}}},
                                          extra_body={"tunesmith": {"overrides": FAST[:-1]}})]
        for job in jobs:
            job, seen = wait(c, job.id, lambda j: j.status in ("succeeded", "failed", "cancelled"), timeout=900)
            assert job.status == "succeeded", job.error
            assert job.fine_tuned_model.startswith("ft:smollm2-135m-instruct:")
            answer = c.chat.completions.create(model=job.fine_tuned_model, max_tokens=8, temperature=0,
                                               messages=[{"role": "user", "content": "Say 5."}])
            assert answer.choices[0].message.content.strip()
        assert {m.id for m in c.models.list()} >= {"smollm2-135m-instruct", *(j.fine_tuned_model for j in
                                                   [c.fine_tuning.jobs.retrieve(x.id) for x in jobs])}
    finally:
        s.stop()
