"""Preprocessing speed: read, validate, render and tokenize N instruction records (default 100k).

    .venv/bin/python bench/data_prep.py [N] [--template chat|alpaca]

Records are the instruct_mix training rows repeated with a counter appended, so every record is
distinct (dedup and the tokenized cache cannot cheat). Prints seconds per stage and peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

from tunesmith.config import DataConfig
from tunesmith.data.prepare import prepare
from tunesmith.data.sources import data_dir
from tunesmith.models.load import load_tokenizer, resolve_model_dir

SOURCE = data_dir() / "instruct_mix" / "train.jsonl"   # the data folder (TUNESMITH_DATA_DIR; docs/data.md)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("n", nargs="?", type=int, default=100_000)
    ap.add_argument("--template", default="chat")
    args = ap.parse_args()
    rows = [json.loads(line) for line in open(SOURCE, encoding="utf-8") if line.strip()]
    tmp = Path(tempfile.mkdtemp())
    path = tmp / "big.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(args.n):
            r = rows[i % len(rows)]
            f.write(json.dumps({"instruction": r["instruction"], "input": r["input"], "output": f"{r['output']} ({i})"}) + "\n")
    os.environ["TUNESMITH_DATA_CACHE"] = str(tmp / "cache")
    tok = load_tokenizer(resolve_model_dir("smollm2-135m-instruct"))
    cfg = DataConfig(path=str(path), template=args.template, max_length=2048, val_size=0.01)
    for label in ("cold", "cached"):
        t0 = time.perf_counter()
        data = prepare(cfg, tok)
        secs = time.perf_counter() - t0
        print(f"{label}: {args.n} records in {secs:.1f} s ({args.n / secs:,.0f} records/s); "
              f"train kept {data.stats['train']['kept']}, tokens {data.stats['train']['tokens']:,}; "
              f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
