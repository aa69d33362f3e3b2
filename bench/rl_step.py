"""Where an online-RL step's time goes, on the real SmolLM2: a few GRPO steps of the `arithmetic-grpo` recipe, then
the median seconds per step of rollouts (sampling on the generation engine), rewards, old/reference log-probs and
the update (the training passes and the optimizer step), and the rollouts' generated tokens per second.

    .venv/bin/python bench/rl_step.py [--steps 6] [--recipe arithmetic-grpo] [key=value ...]

How fast the rollouts are against `model.generate` on the same prompts, group size and lengths is bench/generate.py's
shape (b). Compare ratios within one run: the machines are shared.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from tunesmith.config import load_config
from tunesmith.train.loop import train

PARTS = ("rollout_seconds", "reward_seconds", "logp_seconds", "update_seconds")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--recipe", default="arithmetic-grpo")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(args.recipe, [f"train.max_steps={args.steps}", "train.max_minutes=null", f"output.dir={out}",
                                        "output.name=bench", "eval.samples=0", "eval.max_examples=8", *args.overrides])
        res = train(cfg)
        rows = [json.loads(x) for x in (Path(res.run_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "rollout_seconds" in r and not r.get("rollout_reused")][1:]  # the first pays for warm-up
    if not steps:
        raise SystemExit("no steps to measure: raise --steps")
    med = {k: statistics.median(r[k] for r in steps) for k in PARTS}
    total = sum(med.values())
    print(f"{args.recipe}: {len(steps)} steps measured (after the first), {cfg.train.micro_batch_size} prompts x "
          f"{cfg.rl.group_size} completions, up to {cfg.rl.max_new_tokens} new tokens")
    for k in PARTS:
        print(f"  {k.removesuffix('_seconds'):8s} {med[k]:7.2f} s  {100 * med[k] / total:5.1f} %")
    tok = statistics.median(r["completion_tokens"] / max(r["rollout_seconds"], 1e-9) for r in steps)
    print(f"  rollouts: {tok:.1f} generated tokens/s (median), mean completion length "
          f"{statistics.mean(r['completion_length'] for r in steps):.1f} tokens")


if __name__ == "__main__":
    main()
