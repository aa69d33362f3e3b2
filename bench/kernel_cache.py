"""oneDNN's kernel cache and bfloat16 matmuls on a CPU: GFLOP/s over many distinct row counts.

    ONEDNN_PRIMITIVE_CACHE_CAPACITY=1024  .venv/bin/python bench/kernel_cache.py     # oneDNN's default
    ONEDNN_PRIMITIVE_CACHE_CAPACITY=16384 .venv/bin/python bench/kernel_cache.py     # what tunesmith's CLI sets

One SmolLM2 MLP weight (1536 x 576) times inputs of `--shapes` random row counts (1000-3000, as a training pass's
token counts vary), repeated for `--rounds` rounds. Round 0 compiles every shape's kernel; later rounds reuse them
if the cache holds them all. Training meets a new token count in nearly every pass (docs/performance.md,
"oneDNN's kernel cache"). float32 matmuls do not go through oneDNN in torch's CPU wheels: `--dtype float32` is the
control.
"""
from __future__ import annotations

import argparse
import os
import random
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--shapes", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    random.seed(0)
    torch.manual_seed(0)
    weight = torch.randn(1536, 576, dtype=dtype)
    inputs = torch.randn(3000, 576, dtype=dtype)
    rows = [random.randint(1000, 3000) for _ in range(args.shapes)]
    print(f"{args.dtype}, {len(set(rows))} distinct row counts, "
          f"ONEDNN_PRIMITIVE_CACHE_CAPACITY={os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY', 'unset (1024)')}")
    for rnd in range(args.rounds):
        start, flops = time.perf_counter(), 0
        for m in rows:
            inputs[:m] @ weight.T
            flops += 2 * m * weight.shape[0] * weight.shape[1]
        print(f"round {rnd}: {flops / (time.perf_counter() - start) / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
