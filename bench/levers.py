"""What each speed lever buys: cumulative variants of one LoRA training step, each in a fresh process.

    .venv/bin/python bench/levers.py [--data FILE] [--template chat] [--steps 10] [--levels 5,6]

Variants (each adds one lever to the previous):
  0 baseline     stock peft LoRA (dropout 0.05), batches in random order padded to the longest with an
                 attention mask, full-vocabulary logits for every position, glibc allocator defaults
  1 grouping     length-grouped batches, right padding without an attention mask (causal fast path)
  2 head         vocabulary head + cross-entropy only on label positions, fused (no stored logits)
  3 no-dropout   LoRA dropout 0 (no mask RNG)
  4 merged-lora  one-GEMM LoRA layer on the merged weight
  5 heap         glibc keeps freed memory (no page faults in steady state)
  6 shared-prefix  a prefix common to every row of a pass (system prompt, fixed instruction) runs once
  7 kept-merged  the merged LoRA weight built once per update, not in every forward and backward call
  8 short-spin   OpenMP threads spin briefly before sleeping (GOMP_SPINCOUNT=1000; levels 0-7 wait passively)
Same rows, same LoRA (r16/a32, all linear layers), micro-batch 8, fp32. Reports real tokens/s over
the steps after the first two (warm-up) and the peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time

VARIANTS = ["baseline", "grouping", "head", "no-dropout", "merged-lora", "heap", "shared-prefix", "kept-merged", "short-spin"]


def one(level: int, data: str, template: str, steps: int, min_shared: int | None) -> dict:
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model

    from tunesmith.config import DataConfig, MethodConfig
    from tunesmith.data import prepare
    from tunesmith.data.batching import collate, effective_length, epoch_plan
    from tunesmith.methods import lora
    from tunesmith.methods.load import load_model
    from tunesmith.models import load_tokenizer, resolve_model_dir
    from tunesmith.models import heads as loss_mod
    from tunesmith.models.heads import sum_loss
    from tunesmith.train.machine import configure_threads, keep_heap_memory

    configure_threads(None)
    if level >= 5:
        keep_heap_memory()
    if level < 6:
        loss_mod.MIN_SHARED_TOKENS = 1 << 30
    elif min_shared is not None:
        loss_mod.MIN_SHARED_TOKENS = min_shared
    torch.manual_seed(0)
    model_dir = resolve_model_dir("smollm2-135m-instruct")
    tok = load_tokenizer(model_dir)
    prepared = prepare(DataConfig(path=data, template=template, max_length=512, val_size=0), tok)
    examples = prepared.train.tokens
    model = load_model(model_dir, torch.float32)
    dropout = 0.0 if level >= 3 else 0.05
    if level >= 4:
        model = lora.apply(model, MethodConfig(r=16, alpha=32, dropout=dropout))
    else:
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    if level >= 4:
        lora.keep_merged(model, level >= 7)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    lengths = [len(t.input_ids) for t in examples]
    if level >= 1:
        plan = epoch_plan(lengths, 8, 0, 0)
    else:
        order = list(range(len(examples)))
        random.Random(0).shuffle(order)
        plan = [order[i:i + 8] for i in range(0, len(order), 8)]
    times, tokens = [], []
    for idx in plan[:steps]:
        batch = collate([examples[i] for i in idx], tok.pad_token_id)
        t = time.perf_counter()
        if level >= 2:
            loss = sum_loss(model, batch.input_ids, batch.labels) / batch.label_tokens
        else:
            kwargs = {}
            if level == 0:  # the tutorial passes the padding mask, which forces a dense mask into attention
                lens = torch.tensor([effective_length(examples[i]) for i in idx])
                kwargs["attention_mask"] = (torch.arange(batch.input_ids.shape[1])[None, :] < lens[:, None]).long()
            logits = model(input_ids=batch.input_ids, **kwargs).logits[:, :-1]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        tokens.append(batch.real_tokens)
    steady = sum(tokens[2:]) / sum(times[2:])
    return {"variant": VARIANTS[level], "real_tok_s": round(steady, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="builtin:docstrings")
    ap.add_argument("--template", default="chat")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--levels", default=",".join(str(i) for i in range(len(VARIANTS))), help="comma-separated subset")
    ap.add_argument("--min-shared", type=int, help="override train/loss.py's MIN_SHARED_TOKENS (levels >= 6)")
    ap.add_argument("--level", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.level is not None:
        print("RESULT " + json.dumps(one(a.level, a.data, a.template, a.steps, a.min_shared)), flush=True)
        return
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), TRANSFORMERS_VERBOSITY="error")
    rows = []
    for level in [int(x) for x in a.levels.split(",")]:
        level_env = dict(env, GOMP_SPINCOUNT="1000") if level >= 8 else env
        p = subprocess.run([sys.executable, __file__, "--data", a.data, "--template", a.template, "--steps", str(a.steps),
                            "--level", str(level)] + ([] if a.min_shared is None else ["--min-shared", str(a.min_shared)]),
                           capture_output=True, text=True, env=level_env)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if not line:
            raise SystemExit(p.stderr[-3000:])
        rows.append(json.loads(line[-1][7:]))
        print(f"{level} {rows[-1]['variant']:<13} {rows[-1]['real_tok_s']:>7.1f} tok/s  rss {rows[-1]['peak_rss_mib']} MiB", flush=True)
    print("\n| lever (cumulative) | real tok/s | vs previous | vs baseline | peak RSS MiB |\n|---|---|---|---|---|")
    for i, r in enumerate(rows):
        prev = rows[i - 1]["real_tok_s"] if i else r["real_tok_s"]
        print(f"| {VARIANTS.index(r['variant'])} {r['variant']} | {r['real_tok_s']:.1f} | {r['real_tok_s'] / prev:.2f}x | "
              f"{r['real_tok_s'] / rows[0]['real_tok_s']:.2f}x | {r['peak_rss_mib']} |")


if __name__ == "__main__":
    main()
