"""Golden metrics: a tiny deterministic run's metrics.jsonl, committed in tests/golden/tiny_run.json, so a change of
behaviour shows in review. Every number of every row (loss, lr, grad_norm, tokens, epoch, the held-out metrics before,
during and after training) must match within 1e-6; the timing columns (tok_s, elapsed) are left out.

A change that means to change the numbers rewrites the file, and the diff is the review:
    TUNESMITH_WRITE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_golden.py
Computed on a CPU in float32; another CPU's kernels may round differently in the last digits (then rewrite it there
and say so in the commit).
"""
import json
import math
import os
from pathlib import Path

from tunesmith.config import load_config
from tunesmith.train.loop import train

GOLDEN = Path(__file__).parent / "golden" / "tiny_run.json"
TIMING = {"tok_s", "elapsed"}
TOLERANCE = 1e-6


def tiny_run_rows(tmp_path, model_dir, data) -> list[dict]:
    cfg = load_config(None, [f"model.name={model_dir}", f"data.path={data}", "data.val_size=8", "train.max_steps=12",
                             "train.micro_batch_size=4", "train.lr=1e-2", "train.seed=3", "train.save_every_steps=5",
                             "eval.every_steps=6", "eval.max_examples=8", "eval.samples=0",
                             f"output.dir={tmp_path / 'runs'}", "output.name=golden"])
    res = train(cfg)
    rows = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def close_enough(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=TOLERANCE, abs_tol=TOLERANCE)
    return a == b


def test_a_tiny_run_has_the_golden_metrics(tmp_path, tiny_model_dir, instruction_file):
    rows = tiny_run_rows(tmp_path, tiny_model_dir, instruction_file)
    if os.environ.get("TUNESMITH_WRITE_GOLDEN"):
        GOLDEN.write_text(json.dumps(rows, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert [r["step"] for r in rows] == [r["step"] for r in golden]
    for got, want in zip(rows, golden):
        assert set(got) == set(want), (got["step"], set(got) ^ set(want))
        wrong = {k: (got[k], want[k]) for k in want if not close_enough(got[k], want[k])}
        assert not wrong, f"step {want['step']}: (this run, golden) {wrong}"
