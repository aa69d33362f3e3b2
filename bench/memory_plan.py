"""Check `tunesmith plan`'s memory estimate against the measured peak RSS of real runs.

    .venv/bin/python bench/memory_plan.py [--steps 3]

Each configuration runs `tunesmith plan --json` and then `tunesmith train` for a few steps on
instruct_mix (SmolLM2, examples up to 512 tokens, so passes fill their token budget), each in a
fresh process; the peak RSS of the training process comes from wait4. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

DATA = "datasets:instruct_mix/train.jsonl"   # read from the data folder (TUNESMITH_DATA_DIR; docs/data.md)
CONFIGS = {
    "lora, 512 tokens/pass": ["train.batch_tokens=512"],
    "lora, 1024 tokens/pass": ["train.batch_tokens=1024"],
    "lora, 2048 tokens/pass": ["train.batch_tokens=2048"],
    "lora, 1024, max_length 256": ["train.batch_tokens=1024", "data.max_length=256"],
    "lora, 2048, grad. checkpointing": ["train.batch_tokens=2048", "train.gradient_checkpointing=true"],
    "full, 1024 tokens/pass": ["method.name=full", "train.batch_tokens=1024"],
    "full, 2048 tokens/pass": ["method.name=full", "train.batch_tokens=2048"],
    "qlora, 1024 tokens/pass": ["method.name=qlora", "train.batch_tokens=1024"],
    "qlora, 2048 tokens/pass": ["method.name=qlora", "train.batch_tokens=2048"],
}


def run(args: list[str]) -> tuple[str, float]:
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith.cli.main", *args], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        sys.exit(f"failed: {' '.join(args)}")
    return out, usage.ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--only", help="run only configurations whose name contains this text")
    args = ap.parse_args()
    common = [f"data.path={DATA}", "data.max_length=512", "data.max_examples=400", "data.val_size=16",
              f"train.max_steps={args.steps}", "train.micro_batch_size=16", "eval.max_examples=8", "eval.samples=0"]
    print("| configuration | estimate GiB | measured peak GiB | estimate / measured |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in CONFIGS.items():
            if args.only and args.only not in name:
                continue
            plan = json.loads(run(["plan", *common, *extra, "--json"])[0])
            _, peak = run(["train", *common, *extra, f"output.dir={tmp}", f"output.name=r{abs(hash(name))}"])
            print(f"| {name} | {plan['total'] / 2**30:.2f} | {peak / 2**30:.2f} | {plan['total'] / peak:.2f} |", flush=True)


if __name__ == "__main__":
    main()
