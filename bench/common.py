"""Shared by every benchmark configuration: the data selection, the held-out eval, FLOPs and the result line.

Data (identical for every configuration): instruction/input/output rows become a two-turn chat;
only rows whose chat-formatted length is <= 512 tokens are used (nobody truncates); eval = the
last 100 usable rows; train = the first steps * 8 usable rows (effective batch 8, one epoch).
"""
from __future__ import annotations

import json
import resource
import time

import torch
import torch.nn.functional as F

MAX_LEN = 512
EFFECTIVE_BATCH = 8
N_EVAL = 100
LORA = dict(r=32, alpha=32, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
LR = 2e-4


def messages(row):
    user = row["instruction"] + ("\n\n" + row["input"] if row.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


def chat_ids(tok, row):
    """Full conversation ids and the number of prompt ids."""
    m = messages(row)
    full = tok.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"]
    prompt = tok.apply_chat_template(m[:1], tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    return list(full), len(prompt)


def select_rows(tok, data_file, steps):
    rows = [json.loads(line) for line in open(data_file, encoding="utf-8") if line.strip()]
    usable = [r for r in rows if len(chat_ids(tok, r)[0]) <= MAX_LEN]
    n_train = steps * EFFECTIVE_BATCH
    if len(usable) < n_train + N_EVAL:
        raise SystemExit(f"need {n_train + N_EVAL} usable rows, have {len(usable)}")
    return usable[:n_train], usable[-N_EVAL:]


@torch.no_grad()
def heldout_response_loss(model, tok, rows, bs=8):
    """Mean NLL over assistant tokens (incl. end of turn), fp32, the same code for every configuration."""
    model.eval()
    data = sorted((chat_ids(tok, r) for r in rows), key=lambda x: len(x[0]))
    total = count = 0.0
    for i in range(0, len(data), bs):
        chunk = data[i:i + bs]
        width = max(len(f) for f, _ in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        att = torch.zeros_like(ids)
        resp = torch.zeros_like(ids, dtype=torch.bool)
        for j, (f, p) in enumerate(chunk):
            ids[j, :len(f)] = torch.tensor(f)
            att[j, :len(f)] = 1
            resp[j, p:len(f)] = True
        logits = model(input_ids=ids, attention_mask=att).logits.float()
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        total += nll[resp[:, 1:]].sum().item()
        count += resp[:, 1:].sum().item()
    return total / count


from tunesmith.train.plan import flops_per_token  # noqa: E402,F401  (shared with `tunesmith plan`)


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)


class Clock:
    def __enter__(self):
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t
