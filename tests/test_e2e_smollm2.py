"""End to end with the real bundled SmolLM2 weights: a handful of steps through the CLI."""
import json
import subprocess
import sys

import pytest
import torch

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


def test_plain_peft_loads_tunesmith_adapter_on_smollm2(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunesmith.config import load_config
    from tunesmith.models import load_model, resolve_model_dir
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
