"""Blind A/B judging of a run: two served models answer the same held-out prompts (greedy, batched by the engine);
the pairs are kept in the run folder (`judge-pairs.json`, one session at a time), each shown with a random side first,
and every verdict is one line of the run's `judgements.jsonl` (evaluate/human.py reads and summarises them; the
run's report.html shows them).
"""
from __future__ import annotations

import random
import time
from typing import Optional

from tunesmith.evaluate.human import judgements, summarize
from tunesmith.models.engine import Request, Sampling
from tunesmith.run import RunDir
from tunesmith.run.files import append_jsonl, write_json_atomic
from tunesmith.studio.runs import read_json

PAIRS = "judge-pairs.json"


def start_session(run: RunDir, cfg, a: str, b: str, target_a, target_b, n: int) -> None:
    """Answer `n` held-out prompts with both models and store them as a new session (blocking): prompts no judgement of
    the run or of its lineage's training used (loop.judge_prompts; a child's are its first ancestor's held-out ones)."""
    from tunesmith.studio.loop import judge_prompts

    prompts = judge_prompts(run, n)
    answers = {side: answers_of(t, [p["messages"] for p in prompts], cfg.eval.max_new_tokens)
               for side, t in (("a", target_a), ("b", target_b))}
    rng = random.Random()
    pairs = [{**p, "answer_a": answers["a"][i], "answer_b": answers["b"][i], "first": rng.choice("ab")}
             for i, p in enumerate(prompts)]
    write_json_atomic(run.path / PAIRS, {"a": a, "b": b, "created_at": int(time.time()), "pairs": pairs})


def session_state(run: RunDir) -> dict:
    """The session's pairs as the judge sees them (no model names), the next one to judge, and the summary so far."""
    session = read_json(run.path / PAIRS)
    if not session:
        return {"pairs": [], "next": None, "summary": summarize(judgements(run.path))}
    done = {r["index"] for r in judgements(run.path) if r.get("session") == session["created_at"]}
    shown = [{"index": i, "prompt": p["messages"][-1]["content"] if p["messages"] else "",
              "first": p["answer_" + p["first"]], "second": p["answer_" + ("b" if p["first"] == "a" else "a")],
              "judged": i in done} for i, p in enumerate(session["pairs"])]
    nxt = next((s["index"] for s in shown if not s["judged"]), None)
    return {"pairs": shown, "next": nxt, "summary": summarize(judgements(run.path))}


def record_verdict(run: RunDir, index: int, choice: str) -> Optional[dict]:
    """Append the verdict on pair `index` ("first", "second" or "tie", as shown) to judgements.jsonl; the line, or
    None when the session has no such pair."""
    session = read_json(run.path / PAIRS)
    if not session or not 0 <= index < len(session["pairs"]):
        return None
    p = session["pairs"][index]
    second = "b" if p["first"] == "a" else "a"
    winner = {"first": p["first"], "second": second, "tie": "tie"}[choice]
    line = {"session": session["created_at"], "index": index, "prompt": p["messages"], "reference": p["reference"],
            "a": session["a"], "b": session["b"], "answer_a": p["answer_a"], "answer_b": p["answer_b"],
            "winner": winner, "shown_first": p["first"], "at": int(time.time())}
    append_jsonl(run.judgements, line)
    return line


def answers_of(target, conversations: list[list[dict]], max_new_tokens: int) -> list[str]:
    """Greedy answers of one served model, all submitted at once (the engine batches them)."""
    reqs = []
    for messages in conversations:
        prompt = target.model.prompts.render(messages, target.tokenizer)
        ids = target.tokenizer(prompt, add_special_tokens=target.model.prompts.add_special_tokens)["input_ids"]
        reqs.append(target.engine.submit(Request(ids, Sampling(max_new_tokens=max_new_tokens), [], target.model.adapter)))
    for r in reqs:
        r.wait()
    return [r.text.strip() for r in reqs]
