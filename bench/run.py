"""Speed benchmark: tunesmith vs the tutorial HF Trainer + PEFT recipe vs TRL SFTTrainer, side by side.

    .venv/bin/pip install -e '.[bench]'      # adds TRL
    .venv/bin/python bench/run.py            # default: 3 repetitions, 20 steps, LoRA and full FT

Each configuration runs in a fresh process; the order alternates between repetitions; the fp32
matmul peak is measured in each repetition for MFU. Prints one markdown table (median over
repetitions, ratios computed within each repetition) and keeps raw lines in bench/results/.
Compare ratios within one run, never absolute numbers across runs: the machine may be shared.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# the data folder (TUNESMITH_DATA_DIR, default ~/.cache/tunesmith/data; docs/data.md)
DEFAULT_DATA = Path(os.environ.get("TUNESMITH_DATA_DIR") or Path.home() / ".cache/tunesmith/data") / "instruct_mix" / "train.jsonl"
PAIRS = [("tunesmith", "tutorial"), ("tunesmith", "trl"), ("tunesmith_2proc", "tutorial"), ("tunesmith_2proc", "trl"),
         ("tunesmith_2proc", "tunesmith"), ("tunesmith_full", "tutorial_full")]


def matmul_peak_gflops(seconds: float = 3.0) -> float:
    """Achieved fp32 GFLOP/s of torch.matmul on the model's MLP shape at the default thread count."""
    code = ("import os,time,torch\n"
            "a=torch.randn(2048,576);b=torch.randn(576,1536);c=torch.randn(2048,1536);d=torch.randn(1536,576)\n"
            "for _ in range(3): a@b; c@d\n"
            f"n=0;t=time.perf_counter()\nwhile time.perf_counter()-t<{seconds}: a@b; c@d; n+=1\n"
            "print(n*2*2*2048*576*1536/(time.perf_counter()-t)/1e9)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), check=True)
    return float(out.stdout.strip())


def _env():
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def run_one(name: str, model_dir: str, data: str, steps: int) -> dict:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, str(HERE / "configs.py"), name, model_dir, data, str(steps)],
                       capture_output=True, text=True, env=_env())
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        raise SystemExit(f"{name} failed:\n{p.stderr[-3000:]}")
    result = json.loads(lines[-1][7:])
    print(f"  {name:<15} {result['real_tok_s']:>7.1f} tok/s  loss {result['heldout_response_loss']:.4f}  "
          f"rss {result['peak_rss_mib']} MiB  ({time.perf_counter() - t:.0f} s)", flush=True)
    return result


def summarise(reps: list[dict]) -> str:
    names = list(reps[0]["results"])
    lines = ["| config | real tok/s (median; min-max) | held-out response loss | peak RSS MiB | MFU |",
             "|---|---|---|---|---|"]
    for n in names:
        tps = [r["results"][n]["real_tok_s"] for r in reps]
        loss = statistics.median(r["results"][n]["heldout_response_loss"] for r in reps)
        rss = statistics.median(r["results"][n]["peak_rss_mib"] for r in reps)
        mfu = statistics.median(r["results"][n]["achieved_gflops"] / r["peak_gflops"] for r in reps)
        lines.append(f"| {n} | {statistics.median(tps):.1f} ({min(tps):.1f}-{max(tps):.1f}) | {loss:.4f} | {rss:.0f} | {100 * mfu:.0f}% |")
    lines += ["", "| ratio (within each repetition) | median | per repetition |", "|---|---|---|"]
    for a, b in PAIRS:
        if a in names and b in names:
            ratios = [r["results"][a]["real_tok_s"] / r["results"][b]["real_tok_s"] for r in reps]
            rss = [r["results"][a]["peak_rss_mib"] / r["results"][b]["peak_rss_mib"] for r in reps]
            lines.append(f"| {a} / {b} tok/s | {statistics.median(ratios):.2f}x | {', '.join(f'{x:.2f}' for x in ratios)} |")
            lines.append(f"| {a} / {b} peak RSS | {statistics.median(rss):.2f}x | {', '.join(f'{x:.2f}' for x in rss)} |")
    peaks = [r["peak_gflops"] for r in reps]
    lines += ["", f"fp32 matmul peak (measured per repetition): {', '.join(f'{p:.0f}' for p in peaks)} GFLOP/s"]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA) if DEFAULT_DATA.exists() else "builtin:docstrings")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--configs", default="tunesmith,tutorial,trl,tunesmith_full,tutorial_full")
    a = ap.parse_args()
    sys.path.insert(0, str(HERE.parent / "src"))
    from tunesmith.models import resolve_model_dir

    model_dir = str(resolve_model_dir(a.model))
    data = a.data
    if data == "builtin:docstrings":
        from tunesmith.data.docstrings import cached_path

        data = str(cached_path())
    names = a.configs.split(",")
    if "trl" in names and importlib.util.find_spec("trl") is None:  # checked now, not after the other configs ran
        raise SystemExit("config trl needs TRL: .venv/bin/pip install -e '.[bench]' (or leave trl out of --configs)")
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / f"run-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    print(f"data {data}, {a.steps} steps x 8 examples, {a.reps} repetitions -> {out}")
    reps = []
    for rep in range(a.reps):
        peak = matmul_peak_gflops()
        print(f"repetition {rep + 1}: fp32 matmul peak {peak:.0f} GFLOP/s")
        order = names if rep % 2 == 0 else names[::-1]
        results = {n: run_one(n, model_dir, data, a.steps) for n in order}
        reps.append({"rep": rep, "peak_gflops": peak, "results": {n: results[n] for n in names}})
        with open(out, "a") as fh:
            fh.write(json.dumps(reps[-1]) + "\n")
    table = summarise(reps)
    print("\n" + table)
    (out.with_suffix(".md")).write_text(f"command: {' '.join(sys.argv)}\n\n{table}\n")


if __name__ == "__main__":
    main()
