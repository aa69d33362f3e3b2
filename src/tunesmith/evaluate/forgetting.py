"""Forgetting check: does the tuned model still behave on text unlike its training data?

On a built-in set of short general texts (or the user's), compare tuned with base: perplexity
change, and the mean KL divergence KL(base || tuned) of the next-token distributions. The base
side is measured once (before training, or from the base model in `tunesmith eval`) and kept as
each position's top-64 base tokens and log-probabilities, so the check needs no second model in
memory; KL is computed over those tokens and one bucket for the rest of the vocabulary (a lower bound of the full
KL, never negative; the top tokens carry nearly all of the base's probability mass).
The check flags drift when perplexity rises more than `PPL_RISE` or KL exceeds `KL_LIMIT`.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TOP_K = 64
PPL_RISE = 0.05   # +5 % perplexity
KL_LIMIT = 0.30   # nats per token; LoRA/IA3 on the docstring task measured ~0.10 with perplexity unchanged

GENERAL_TEXTS = [
    "The water cycle describes how water evaporates from oceans and lakes, condenses into clouds, and returns to the ground as rain or snow.",
    "To make a simple tomato sauce, warm olive oil with garlic, add crushed tomatoes and a pinch of salt, and let it simmer for twenty minutes.",
    "Dear Sam, thank you for your letter. We arrived in Lisbon on Tuesday and spent the afternoon walking along the river.",
    "The French Revolution began in 1789 and transformed the political landscape of Europe, ending the absolute monarchy in France.",
    "Regular exercise strengthens the heart, improves mood, and helps people sleep better, even when it is only a short daily walk.",
    "A: Are you coming to the meeting tomorrow? B: Yes, but I might be a few minutes late because of the train.",
    "Photosynthesis allows plants to turn sunlight, water and carbon dioxide into sugar, releasing oxygen as a by-product.",
    "The orchestra tuned their instruments while the audience slowly found their seats in the old concert hall.",
    "If you cannot log in, check that caps lock is off, then reset your password using the link on the sign-in page.",
    "Mount Everest, on the border between Nepal and China, is the highest mountain above sea level on Earth.",
    "She opened the window, and the smell of fresh bread from the bakery across the street filled the small kitchen.",
    "Interest is the cost of borrowing money; a higher interest rate makes loans more expensive and saving more attractive.",
]


@torch.no_grad()
def measure_base(model, tokenizer, texts: list[str] = GENERAL_TEXTS) -> dict[str, torch.Tensor]:
    """Per text: ids, the base's top-k next-token ids and log-probs, and its log-prob of the actual next token."""
    was = model.training
    model.eval()
    out = {}
    for i, text in enumerate(texts):
        ids = _ids(tokenizer, text, model)
        logp = _logprobs(model, ids)
        top = logp.topk(TOP_K, dim=-1)
        out[f"ids_{i}"] = ids.cpu()
        out[f"top_idx_{i}"] = top.indices.cpu().to(torch.int32)
        out[f"top_logp_{i}"] = top.values.cpu()
        out[f"target_logp_{i}"] = logp.gather(-1, ids[1:, None]).squeeze(-1).cpu()
    model.train(was)
    return out


@torch.no_grad()
def compare_to_base(model, base: dict[str, torch.Tensor]) -> dict:
    was = model.training
    model.eval()
    n_texts = len([k for k in base if k.startswith("ids_")])
    base_nll = tuned_nll = kl_sum = 0.0
    tokens = 0
    device = next(model.parameters()).device
    for i in range(n_texts):
        ids = base[f"ids_{i}"].to(device)
        logp = _logprobs(model, ids).cpu()
        base_nll -= float(base[f"target_logp_{i}"].sum())
        tuned_nll -= float(logp.gather(-1, ids[1:, None].cpu()).sum())
        kl_sum += float(top_k_kl(base[f"top_logp_{i}"], logp.gather(-1, base[f"top_idx_{i}"].long())).sum())
        tokens += len(ids) - 1
    model.train(was)
    base_ppl, tuned_ppl = math.exp(base_nll / tokens), math.exp(tuned_nll / tokens)
    change = tuned_ppl / base_ppl - 1
    kl = kl_sum / tokens
    return {"texts": n_texts, "tokens": tokens, "base_ppl": round(base_ppl, 3), "tuned_ppl": round(tuned_ppl, 3),
            "ppl_change_pct": round(100 * change, 2), "mean_kl": round(kl, 4),
            "drifted": bool(change > PPL_RISE or kl > KL_LIMIT),
            "limits": {"ppl_rise_pct": 100 * PPL_RISE, "kl": KL_LIMIT}}


def top_k_kl(base_top: torch.Tensor, tuned_top: torch.Tensor) -> torch.Tensor:
    """Per position, KL(base || tuned) over the base's top-k tokens plus one bucket for all other tokens, from the
    two models' log-probs of those k tokens (..., k). A KL of coarsened distributions: never negative and never above
    the full KL. (The top-k terms alone went negative when the tuned model put more mass on the base's top tokens,
    e.g. -0.003 after GRPO on the TL;DR.)"""
    rest_base = (1 - base_top.exp().sum(-1)).clamp(min=1e-12)
    rest_tuned = (1 - tuned_top.exp().sum(-1)).clamp(min=1e-12)
    return (base_top.exp() * (base_top - tuned_top)).sum(-1) + rest_base * (rest_base.log() - rest_tuned.log())


def save_base(path: Path, base: dict[str, torch.Tensor]) -> None:
    """Atomically (a resume reads it back): a temporary file, then a rename."""
    import os

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file({k: v.contiguous() for k, v in base.items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_base(path: Path) -> dict[str, torch.Tensor] | None:
    return load_file(path) if path.exists() else None


def _ids(tokenizer, text: str, model) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    return torch.tensor(ids, dtype=torch.long, device=next(model.parameters()).device)


def _logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """(T-1, V) log-probs of the next token at each position."""
    logits = model(input_ids=ids[None], use_cache=False).logits[0].float()
    logits = logits[-len(ids):-1]  # prompt tuning prepends virtual positions
    return torch.log_softmax(logits, dim=-1)
