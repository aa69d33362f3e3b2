"""`tunesmith eval RUN --judge JUDGE [--runs OTHER]`: two models' answers to the same held-out prompts, compared
pair by pair by a judge -- the yardstick of the published RL wins on open-ended tasks (TL;DR, HH), where ROUGE
against one reference misses what a reward optimises.

The two models: the run ("tuned") and the one `--runs` run, or the base without `--runs`; each answers greedily, prompted
as it was trained (its template, system prompt and tokenizer), up to `--max-new-tokens` (default: rl.max_new_tokens for
an RL run, else eval.max_new_tokens). The judge:

  * a reward-model run (`--judge runs/NAME`, trained with task=reward): it scores each answer after the conversation,
    rendered as that run was trained (objectives/rewards.py, RewardModelScorer); the higher score wins, equal scores
    tie. Each answer is scored alone, so there is no position to swap.
  * an OpenAI-compatible chat endpoint (`--judge http://host:port/v1 --judge-model NAME`: llama.cpp's server, Ollama,
    vLLM, `tunesmith serve`, a hosted API with TUNESMITH_JUDGE_API_KEY set): every pair is judged twice, the tuned
    model's answer first (A) and then second (B). A pair counts as won or lost only when both orders agree; otherwise
    (the judge followed the position, or gave no letter) it is a tie. The request is a chat completion at temperature
    0, max_tokens 16, with the judging prompt below; the verdict is the first standalone letter A or B in the reply.
    Calls run 4 at a time.

The judging prompt (JUDGE_SYSTEM, then JUDGE_USER with the conversation and the two answers filled in):

    system: You are a careful, impartial judge of answers written by AI assistants.
    user:   Which response answers the request below better? Judge how helpful, correct, harmless and faithful to the
            request each one is. Do not let the order of the responses or their length decide; a shorter response
            that does the job is better than a longer one that does not.

            [Request]
            {request}

            [Response A]
            {a}

            [Response B]
            {b}

            Reply with one letter: A if Response A is better, B if Response B is better.

`{request}` is the last user message, or for a conversation of several turns each turn as `User: ...` /
`Assistant: ...` lines (a system prompt as `System: ...`).

The result: wins, losses and ties of the tuned model; its win rate over decided pairs with a 95 % Wilson interval and
the exact two-sided sign test of wins against losses (ties dropped), the win rate with ties counted as half (the
convention of TRL's and AlpacaEval's judge win rates), and for an endpoint judge how often its two orders agreed and
how often it picked the first position. Kept as `evaluations/NNN-<data>-<n>-judge.json` with every pair's answers and
verdicts. An endpoint that does not answer `GET /models` stops the command in one line before anything loads.

HTTP with the standard library (urllib): two JSON calls do not need a client library, and `openai` is not a
dependency of tunesmith.
"""
from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.assemble import assemble
from tunesmith.config import load_config, read_yaml
from tunesmith.data.render import render
from tunesmith.errors import TunesmithError
from tunesmith.evaluate.evaluation import _load, _next_evaluation_path, eval_examples
from tunesmith.evaluate.human import sign_test, wilson
from tunesmith.models import load_tokenizer, pick_device
from tunesmith.models.generate import Sampling, generate
from tunesmith.objectives.rl import rollouts_for
from tunesmith.run import RunDir
from tunesmith.run.files import write_json_atomic

JUDGE_SYSTEM = "You are a careful, impartial judge of answers written by AI assistants."
JUDGE_USER = """Which response answers the request below better? Judge how helpful, correct, harmless and faithful to the request each one is. Do not let the order of the responses or their length decide; a shorter response that does the job is better than a longer one that does not.

[Request]
{request}

[Response A]
{a}

[Response B]
{b}

Reply with one letter: A if Response A is better, B if Response B is better."""
VERDICT = re.compile(r"\b([AB])\b")
KEY_ENV = "TUNESMITH_JUDGE_API_KEY"
TIMEOUT_S = 120.0   # one judgement (a large local model on a CPU is slow)
PROBE_TIMEOUT_S = 10.0
WORKERS = 4


@dataclass(frozen=True)
class Endpoint:
    url: str        # the API base, e.g. http://127.0.0.1:8000/v1
    model: str


def is_endpoint(judge: str) -> bool:
    return judge.startswith(("http://", "https://"))


def _headers() -> dict:
    headers = {"Content-Type": "application/json"}
    if os.environ.get(KEY_ENV):
        headers["Authorization"] = f"Bearer {os.environ[KEY_ENV]}"
    return headers


def _call(url: str, body: dict | None, timeout: float) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=_headers(), method="POST" if body is not None else "GET")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read().decode())


def _why(e: Exception) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def check_endpoint(url: str, model: str | None) -> Endpoint:
    """The endpoint answers GET /models and serves `model` (when it lists models): else a one-line error."""
    if not model:
        raise TunesmithError(f"--judge {url}: name the model the endpoint should judge with: --judge-model NAME")
    base = url.rstrip("/")
    try:
        listed = _call(f"{base}/models", None, PROBE_TIMEOUT_S)
    except Exception as e:  # connection refused, timeout, HTTP error, not JSON
        raise TunesmithError(f"judge endpoint {base} does not answer (GET {base}/models: {_why(e)}); start it, or check "
                             f"the URL (it ends in /v1)") from None
    names = [m.get("id") for m in listed.get("data", []) if isinstance(m, dict)] if isinstance(listed, dict) else []
    if names and model not in names:
        raise TunesmithError(f"judge endpoint {base} does not serve model {model!r}; it serves: {', '.join(names)}")
    return Endpoint(base, model)


def check_reward_run(judge: str) -> Path:
    run = RunDir(Path(judge).expanduser())
    if not run.final.is_dir():
        raise TunesmithError(f"--judge {judge}: neither an endpoint (http://host:port/v1) nor a finished run (no final/)")
    task = read_yaml(run.config).get("task") if run.config.exists() else None
    if task != "reward":
        raise TunesmithError(f"--judge {judge}: a judge run must be a reward model (task=reward), this one is task={task}")
    return run.path


def request_text(messages: list[dict]) -> str:
    """What the judge reads as the request: the user's message, or the conversation turn by turn."""
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) == 1 and not any(m["role"] == "system" for m in messages):
        return turns[0]["content"]
    names = {"user": "User", "assistant": "Assistant", "system": "System", "text": "User"}
    return "\n".join(f"{names.get(m['role'], m['role'])}: {m['content']}" for m in messages)


def parse_verdict(reply: str) -> str | None:
    found = VERDICT.search(reply or "")
    return found.group(1) if found else None


def ask(endpoint: Endpoint, request: str, a: str, b: str) -> tuple[str | None, str]:
    """(verdict "A" / "B" / None, the judge's reply) for one ordering."""
    body = {"model": endpoint.model, "temperature": 0, "max_tokens": 16,
            "messages": [{"role": "system", "content": JUDGE_SYSTEM},
                         {"role": "user", "content": JUDGE_USER.format(request=request, a=a, b=b)}]}
    last = None
    for _ in range(3):
        try:
            reply = _call(f"{endpoint.url}/chat/completions", body, TIMEOUT_S)
            text = reply["choices"][0]["message"]["content"] or ""
            return parse_verdict(text), text
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise TunesmithError(f"judge endpoint {endpoint.url}: not a chat completion reply ({_why(e)})") from None
        except Exception as e:
            last = e
    raise TunesmithError(f"judge endpoint {endpoint.url} failed three times on one judgement: {_why(last)}")


def decide(first: str | None, second: str | None) -> str:
    """One pair's outcome for the tuned model from its two orderings: `first` with the tuned answer as A, `second` with
    it as B. "win" / "loss" only when both agree, else "tie"."""
    if first == "A" and second == "B":
        return "win"
    if first == "B" and second == "A":
        return "loss"
    return "tie"


def summarise(outcomes: list[str]) -> dict:
    wins, losses = outcomes.count("win"), outcomes.count("loss")
    ties, decided = len(outcomes) - wins - losses, wins + losses
    low, high = wilson(wins, decided) if decided else (0.0, 1.0)
    return {"judged": len(outcomes), "wins": wins, "losses": losses, "ties": ties,
            "win_rate": round(wins / decided, 4) if decided else None, "win_rate_ci95": [round(low, 4), round(high, 4)],
            "win_rate_ties_half": round((wins + ties / 2) / len(outcomes), 4) if outcomes else None,
            "p_sign_test": round(sign_test(wins, losses), 6)}


def judge_by_endpoint(endpoint: Endpoint, requests: list[str], tuned: list[str], other: list[str]) -> tuple[dict, list[dict]]:
    jobs = [(q, t, o) for q, t, o in zip(requests, tuned, other)]
    with ThreadPoolExecutor(WORKERS) as pool:
        firsts = list(pool.map(lambda j: ask(endpoint, j[0], j[1], j[2]), jobs))
        seconds = list(pool.map(lambda j: ask(endpoint, j[0], j[2], j[1]), jobs))
    pairs = [{"tuned_first": f[0], "tuned_second": s[0], "replies": [f[1], s[1]], "outcome": decide(f[0], s[0])}
             for f, s in zip(firsts, seconds)]
    stats = summarise([p["outcome"] for p in pairs])
    verdicts = [f[0] for f in firsts] + [s[0] for s in seconds]
    stats["orders_agree"] = round(sum(p["outcome"] != "tie" for p in pairs) / max(1, len(pairs)), 4)
    stats["first_position_picked"] = round(verdicts.count("A") / max(1, sum(v is not None for v in verdicts)), 4)
    stats["no_verdict"] = sum(v is None for v in verdicts)
    return stats, pairs


def judge_by_reward_model(path: Path, rollouts_tuned, rollouts_other, device) -> tuple[dict, list[dict]]:
    from tunesmith.objectives.rewards import RewardModelScorer

    scorer = RewardModelScorer(str(path), device)
    tuned, other = scorer(rollouts_tuned), scorer(rollouts_other)
    pairs = [{"tuned_score": round(t, 5), "other_score": round(o, 5),
              "outcome": "win" if t > o else "loss" if t < o else "tie"} for t, o in zip(tuned, other)]
    stats = summarise([p["outcome"] for p in pairs])
    stats["mean_score"] = {"tuned": round(sum(tuned) / len(tuned), 5), "other": round(sum(other) / len(other), 5)}
    return stats, pairs


def judge_runs(run_dir: Path, judge: str | list[str] | tuple[str, ...], judge_model: str | None = None,
               other_runs: tuple[Path, ...] = (), data_path: str | None = None, n: int = 50,
               max_new_tokens: int | None = None, log=print) -> dict | list[dict]:
    """One judge (a str): its result. Several (`--judge J1 J2`, e.g. the reward model RL optimised and a held-out one):
    the two models answer once and each judge judges the same answers; a list of results, one file each."""
    judges = [judge] if isinstance(judge, str) else list(judge)
    # -- everything that can be wrong with the command, before anything loads
    if not judges:
        raise TunesmithError("--judge: name a judge (a reward-model run or an endpoint)")
    if len(other_runs) > 1:
        raise TunesmithError("--judge compares two models: give one --runs run (or none: the run against its base)")
    run_dir = RunDir(run_dir)
    for r in (run_dir, *map(RunDir, other_runs)):
        if not r.final.is_dir():
            raise TunesmithError(f"{r} has no final model (is it a finished tunesmith run?)")
    if judge_model and not any(map(is_endpoint, judges)):
        raise TunesmithError("--judge-model names an endpoint's model; a reward-model judge run needs none")
    checked = [(check_endpoint(j, judge_model), None) if is_endpoint(j) else (None, check_reward_run(j)) for j in judges]
    # -- the prompts, the two models' answers
    cfg = load_config(str(run_dir.config))
    device = torch.device(pick_device())
    run = assemble(cfg, device, with_model=False)
    examples = eval_examples(run, cfg, data_path, n)
    cap = max_new_tokens or (cfg.rl.max_new_tokens if run.task == "rl" else cfg.eval.max_new_tokens)
    tokenizer = load_tokenizer(run_dir.final)
    other_name = Path(other_runs[0]).name if other_runs else "base"
    models = {"tuned": run_dir.final, other_name: RunDir(other_runs[0]).final if other_runs else run.model_dir}
    answers = {}
    for name, path in models.items():
        own_cfg = cfg if name in ("base", "tuned") else load_config(str(RunDir(path.parent).config))
        own_tokenizer = tokenizer if name in ("base", "tuned") else load_tokenizer(path)
        prompts = [render(ex, own_cfg.data.template, own_tokenizer, False, own_cfg.data.system_prompt).prompt for ex in examples]
        model = _load(path, run.precision.dtype, device)
        answers[name] = [g.text for g in generate(model, own_tokenizer, prompts, Sampling(max_new_tokens=cap),
                                                  add_special_tokens=own_cfg.data.template != "chat", progress=name)]
        del model
    rendered = [render(ex, cfg.data.template, tokenizer, False, cfg.data.system_prompt) for ex in examples]
    tuned_rollouts = rollouts_for(examples, rendered, answers["tuned"], [[] for _ in examples], 1)
    other_rollouts = rollouts_for(examples, rendered, answers[other_name], [[] for _ in examples], 1)
    requests = [request_text(conv) for conv in tuned_rollouts.conversations]
    # -- the judges, each on the same answers
    results = []
    for judge_name, (endpoint, judge_run) in zip(judges, checked):
        what = f"{endpoint.model} at {endpoint.url}" if endpoint else str(judge_run)
        log(f"judging tuned against {other_name} on {len(examples)} prompts with {what}"
            + (" (each pair twice, positions swapped)" if endpoint else " (reward model: each answer scored alone)"))
        if endpoint:
            stats, pairs = judge_by_endpoint(endpoint, requests, answers["tuned"], answers[other_name])
        else:
            stats, pairs = judge_by_reward_model(judge_run, tuned_rollouts, other_rollouts, device)
        for p, q, t, o in zip(pairs, requests, answers["tuned"], answers[other_name]):
            p.update({"request": q, "tuned": t, "other": o})
        result = {"task": "judge", "judge": judge_name, "judge_model": judge_model if endpoint else None,
                  "tuned": str(run_dir), "other": other_name, "data": data_path or "validation split",
                  "examples": len(examples), "max_new_tokens": cap, **stats, "pairs": pairs}
        kept = _next_evaluation_path(run_dir, data_path, len(examples))
        kept = kept.with_name(f"{kept.stem}-judge.json")
        write_json_atomic(kept, result)
        log(describe(result))
        log(f"saved: {kept}")
        results.append(result)
    return results[0] if isinstance(judge, str) else results


def describe(r: dict) -> str:
    if r["win_rate"] is None:
        head = f"tuned vs {r['other']}: {r['judged']} pairs, all ties"
    else:
        lo, hi = r["win_rate_ci95"]
        head = (f"tuned vs {r['other']}: {r['wins']} wins, {r['losses']} losses, {r['ties']} ties; win rate "
                f"{100 * r['win_rate']:.1f} % (95 % interval {100 * lo:.1f}-{100 * hi:.1f} %), sign test p = "
                f"{r['p_sign_test']:.3g}; ties as half {100 * r['win_rate_ties_half']:.1f} %")
    if "orders_agree" in r:
        head += (f"; the judge's two orders agreed on {100 * r['orders_agree']:.0f} % of pairs, it picked the first "
                 f"position {100 * r['first_position_picked']:.0f} % of the time")
    return head
