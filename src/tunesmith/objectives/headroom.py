"""Headroom: what a policy's own samples reach beyond its greedy answer, measured before RL spends minutes on it.

RL can only push up answers the model already samples. Where K samples of a problem are right no more often than the
greedy answer (pass@K close to pass@1), or the answer format never comes out at all, there is nothing for a group of
completions to tell apart, and more supervised fine-tuning is the better use of the time (the published small-model
wins all started with pass@k well above pass@1: docs/methods.md, "Online RL").

For each prompt: the greedy answer and K samples at the given temperature, all scored by the rewards (rewards.py).
Per reward:
  * a binary one (every value 0 or 1: `numeric`, `exact`, `countdown`, `regex`, a 0/1 `function`): pass@1 of the
    greedy answer, the mean of the samples (pass@1 sampled) and pass@k for k = 2, 4, ... K by the unbiased estimator of Chen
    et al. 2021 (Codex, eq. 1: 1 - C(n - c, k) / C(n, k) per problem with c of n samples right, averaged);
  * any other (`model`, `rouge`, `length`, ...): the greedy answer's mean, the samples' mean and best-of-K (the best
    of a prompt's K samples, averaged over prompts).
The weighted total gets the three means too. Intervals are 95 %: Wilson's for a share of prompts (pass@1 greedy,
pass@K), a bootstrap of the prompts (2000 resamples, seeded) for means (pass@k below K, rewards).

The verdict (`warnings`): "warm up with SFT first" when no sample of any prompt passes the answer check, or a format
check (a `regex` reward) never passes; "little to gain" when pass@K is within MIN_GAIN of pass@1 (or, for a reward
with no answer check, when best-of-K is not above greedy beyond the interval of their per-prompt difference).

Our own few lines: the estimator and the two intervals are a dozen lines each, and this module sits below
tunesmith.evaluate (an RL run measures headroom before its first step; `tunesmith eval --samples K` reads the same
function).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from tunesmith.errors import TunesmithError
from tunesmith.models.engine import Engine, Request, Sampling, supports
from tunesmith.objectives.rewards import Reward, Rollouts, score_all

MIN_GAIN = 0.05           # pass@K - pass@1 below this (5 points): little for RL to gain
ANSWER_KINDS = ("numeric", "exact", "function", "countdown")  # binary ones of these kinds check the answer
BOOTSTRAP_RESAMPLES = 2000
Z95 = 1.959963984540054


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. 2021's unbiased estimate of P(at least one of k samples is right) from n samples with c right:
    1 - C(n - c, k) / C(n, k), as the product 1 - prod_{i = n - c + 1}^{n} (1 - k / i) (no huge binomials)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples (got {n})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval of a proportion k / n (95 % by default)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_mean(values, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """95 % interval of the mean of per-prompt values, the prompts resampled with replacement (seeded)."""
    v = torch.as_tensor(values, dtype=torch.float64)
    if len(v) < 2:
        m = float(v.mean()) if len(v) else float("nan")
        return m, m
    g = torch.Generator().manual_seed(seed)
    means = v[torch.randint(len(v), (resamples, len(v)), generator=g)].mean(dim=1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=means.dtype))
    return float(low), float(high)


def ks_for(samples: int) -> list[int]:
    """The k reported for K samples: 2, 4, 8, ... below K, and K."""
    ks, k = [], 2
    while k < samples:
        ks.append(k)
        k *= 2
    return ks + [samples]


def _r(x: float) -> float:
    return round(float(x), 4)


def _ci(pair) -> list[float]:
    return [_r(pair[0]), _r(pair[1])]


def reward_headroom(greedy: torch.Tensor, sampled: torch.Tensor) -> dict | None:
    """One reward's numbers from its greedy scores (n,) and sampled scores (n, K), NaN where it does not apply (a
    prompt whose gold has no number); None when it applies to no prompt."""
    known = ~torch.isnan(greedy) & ~torch.isnan(sampled).any(dim=1)
    g, s = greedy[known].double(), sampled[known].double()
    n, K = s.shape
    if n == 0:
        return None
    binary = bool(((g == 0) | (g == 1)).all() and ((s == 0) | (s == 1)).all())
    if binary:
        right = s.sum(dim=1).long().tolist()
        greedy_right = int(g.sum())
        out = {"binary": True, "prompts": n, "pass@1": _r(greedy_right / n), "pass@1_ci95": _ci(wilson(greedy_right, n)),
               "pass@1_sampled": _r(s.mean()), "pass@1_sampled_ci95": _ci(bootstrap_mean(s.mean(dim=1)))}
        for k in ks_for(K):
            each = [pass_at_k(K, c, k) for c in right]
            solved = sum(c > 0 for c in right)
            out[f"pass@{k}"] = _r(sum(each) / n)
            out[f"pass@{k}_ci95"] = _ci(wilson(solved, n) if k == K else bootstrap_mean(each))
        out["gain"] = _r(out[f"pass@{K}"] - out["pass@1"])
        return out
    best = s.max(dim=1).values
    return {"binary": False, "prompts": n, **_means(g, s, best)}


def _means(g: torch.Tensor, s: torch.Tensor, best: torch.Tensor) -> dict:
    diff = bootstrap_mean(best - g)
    return {"greedy_mean": _r(g.mean()), "greedy_mean_ci95": _ci(bootstrap_mean(g)),
            "sample_mean": _r(s.mean()), "sample_mean_ci95": _ci(bootstrap_mean(s.mean(dim=1))),
            "best_of_k_mean": _r(best.mean()), "best_of_k_mean_ci95": _ci(bootstrap_mean(best)),
            "best_minus_greedy_ci95": _ci(diff)}


def answer_check(rewards: list[Reward], kinds: dict[str, str], table: dict) -> str | None:
    """The reward that says an answer is right: the first binary reward of kind numeric / exact / function /
    countdown (weight 0 counts too: a logged strict check), else None."""
    for r in rewards:
        if kinds.get(r.name) in ANSWER_KINDS and (table.get(r.name) or {}).get("binary"):
            return r.name
    return None


def summarise(rewards: list[Reward], kinds: dict[str, str], greedy_total: torch.Tensor, sampled_total: torch.Tensor,
              greedy_table: torch.Tensor, sampled_table: torch.Tensor, samples: int, cut: float) -> dict:
    """The headroom of one model: per reward (reward_headroom), the total, the answer check, and the warnings.
    `greedy_table` (rewards, n) and `sampled_table` (rewards, n, K) as score_all gives them, reshaped."""
    per = {}
    for k, r in enumerate(rewards):
        per[r.name] = reward_headroom(greedy_table[k], sampled_table[k])
    n = greedy_total.shape[0]
    total = _means(greedy_total.double(), sampled_total.double(), sampled_total.double().max(dim=1).values)
    check = answer_check(rewards, kinds, per)
    out = {"prompts": n, "samples": samples, "check": check, "rewards": per, "total": total,
           "samples_cut": _r(cut)}
    out["warnings"] = verdict(out, kinds)
    return out


def verdict(h: dict, kinds: dict[str, str]) -> list[str]:
    """What the numbers say about RL on this model (module docstring): empty when there is room to gain."""
    K, n, said = h["samples"], h["prompts"], []
    for name, r in h["rewards"].items():
        if r and kinds.get(name) == "regex" and r["binary"] and r[f"pass@{K}"] == 0:
            said.append(f"the format checked by reward {name!r} never appeared in {K} samples of {n} prompts: RL cannot "
                        f"reinforce what the model never writes; warm up with SFT first (answers in that format)")
    check = h["check"]
    if check:
        r = h["rewards"][check]
        if r[f"pass@{K}"] == 0:
            said.append(f"no sample of {K} was right ({check}) on any of {r['prompts']} held-out prompts: every group's "
                        f"rewards are equal and teach nothing; warm up with SFT first (worked solutions ending in the "
                        f"answer)")
        elif r[f"pass@{K}"] - r["pass@1"] < MIN_GAIN:
            said.append(f"little to gain: pass@{K} {100 * r[f'pass@{K}']:.1f} % is within {100 * MIN_GAIN:.0f} points of "
                        f"pass@1 {100 * r['pass@1']:.1f} % ({check}): RL can at best make the greedy answer as good as "
                        f"the best of {K} samples; more SFT is likely the better use of the time")
    elif h["total"]["best_minus_greedy_ci95"][0] <= 0:
        said.append(f"little to gain: the best of {K} samples scores no higher than the greedy answer beyond chance "
                    f"(total reward, best - greedy 95 % interval {h['total']['best_minus_greedy_ci95']}): more SFT is "
                    f"likely the better use of the time")
    return said


def describe(h: dict) -> str:
    """One line of the headroom's numbers."""
    K = h["samples"]
    parts = []
    for name, r in h["rewards"].items():
        if r is None:
            continue
        if r["binary"]:
            lo, hi = r["pass@1_ci95"]
            klo, khi = r[f"pass@{K}_ci95"]
            parts.append(f"{name} pass@1 {100 * r['pass@1']:.1f} % ({100 * lo:.1f}-{100 * hi:.1f}), sampled "
                         f"{100 * r['pass@1_sampled']:.1f} %, pass@{K} {100 * r[f'pass@{K}']:.1f} % ({100 * klo:.1f}-{100 * khi:.1f})")
        else:
            parts.append(f"{name} greedy {r['greedy_mean']:.3f}, sampled {r['sample_mean']:.3f}, best of {K} "
                         f"{r['best_of_k_mean']:.3f} {r['best_of_k_mean_ci95']}")
    t = h["total"]
    parts.append(f"total reward greedy {t['greedy_mean']:.3f}, best of {K} {t['best_of_k_mean']:.3f}")
    return f"{h['prompts']} prompts, greedy + {K} samples: " + "; ".join(parts) + f"; {100 * h['samples_cut']:.0f} % of samples cut at the cap"


@torch.no_grad()
def measure_headroom(model, tokenizer, prompts: list[list[int]], rollouts_of: Callable[[list[str], list[list[int]], int], Rollouts],
                     rewards: list[Reward], kinds: dict[str, str], samples: int, temperature: float, top_p: float,
                     max_new_tokens: int, seed: int = 0, rows: int = 64) -> dict:
    """The headroom of `model` on `prompts` (token ids): each prompt's greedy answer and `samples` answers at
    `temperature`, seeded per (prompt, sample). `rollouts_of(texts, ids, per)` gives what the rewards see of answers
    in prompt order, `per` answers per prompt; `kinds`: each reward's kind by name."""
    if samples < 2:
        raise TunesmithError(f"headroom needs K >= 2 samples per prompt (got {samples})")
    if (why := supports(model)) is not None:
        raise TunesmithError(f"the headroom check samples on the generation engine, which cannot run this model: {why}")
    was = model.training
    engine = Engine(model, tokenizer, max_rows=min(rows, max(1, len(prompts) * (samples + 1))))
    greedy = [Request(list(p), Sampling(max_new_tokens=max_new_tokens)) for p in prompts]
    sampled = [Request(list(p), Sampling(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_k=0,
                                         top_p=top_p, seed=(seed * 1_000_003 + i * 1_009 + g) % (2**63 - 1)))
               for i, p in enumerate(prompts) for g in range(samples)]
    try:
        engine.run(greedy + sampled)
    finally:
        model.train(was)
    failed = next((r for r in greedy + sampled if r.finish_reason == "error"), None)
    if failed is not None:
        raise RuntimeError(f"headroom generation failed: {failed.error}")
    n = len(prompts)
    g_total, g_table = score_all(rewards, rollouts_of([r.text for r in greedy], [r.output_ids for r in greedy], 1))
    s_total, s_table = score_all(rewards, rollouts_of([r.text for r in sampled], [r.output_ids for r in sampled], samples))
    cut = sum(r.finish_reason == "length" for r in sampled) / max(1, len(sampled))
    return summarise(rewards, kinds, g_total, s_total.view(n, samples), g_table, s_table.view(len(rewards), n, samples),
                     samples, cut)


def flat_metrics(h: dict) -> dict:
    """The numbers as flat `headroom_*` keys (metrics.jsonl's step-0 row, eval.json's `before`, trackers): the answer
    check's pass@1 / pass@K, each reward's pass@1 / pass@K (0/1 rewards) or greedy / best-of-K means, the total's.
    `pass_at_K`, not `pass@K`: MLflow's metric names take letters, digits, `_ - . /` and spaces only."""
    K = h["samples"]
    out = {"headroom_samples": K, "headroom_prompts": h["prompts"], "headroom_warnings": len(h["warnings"])}
    if h["check"]:
        out["headroom_pass_at_1"] = h["rewards"][h["check"]]["pass@1"]
        out[f"headroom_pass_at_{K}"] = h["rewards"][h["check"]][f"pass@{K}"]
    for name, r in h["rewards"].items():
        if r is None:
            continue
        if r["binary"]:
            out[f"headroom_{name}_pass_at_1"], out[f"headroom_{name}_pass_at_{K}"] = r["pass@1"], r[f"pass@{K}"]
        else:
            out[f"headroom_{name}_greedy"], out[f"headroom_{name}_best_of_{K}"] = r["greedy_mean"], r["best_of_k_mean"]
    out["headroom_reward_greedy"] = h["total"]["greedy_mean"]
    out[f"headroom_reward_best_of_{K}"] = h["total"]["best_of_k_mean"]
    return out
