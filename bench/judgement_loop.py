"""The judgement loop on the bundled SmolLM2, end to end in a real browser (issue 53): a scripted judge that always
prefers the shorter answer judges a set of blind pairs; *Train on these judgements* makes a child (DPO from the judged
model); the child's new set of pairs -- child vs parent, on held-out prompts no judgement used -- is judged by the same
judge. Must hold: the child's answers are shorter, and the judge prefers the child on >= 70 % of decided pairs with a
sign test p < 0.05.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/judgement_loop.py [--judge 40] [--new 30] [--epochs 2] \
        [--parent-epochs 1] [--screenshots docs/img] [--out bench/results]

The studio runs in-process on a free loopback port with its home in a temporary folder; the page is driven by
Playwright in Debian's Chromium (/usr/bin/chromium: nothing downloads a browser). The parent (v1) is SmolLM2-135M-
Instruct tuned (LoRA) on 192 made-up questions about everyday objects whose answers are padded with chatty filler, so
v1 is wordier than its base; 110 questions are held out. The scripted judge reads the two answers the page shows (A,
B), presses 1 or 2 for the shorter one and T when they are as long. Everything it measures comes from the page and the
run folders; one JSON line and a markdown table go to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from tunesmith.evaluate.human import sign_test, wilson
from tunesmith.studio.app import Studio, build_studio, server_config

ITEMS = [  # (object, what it is, what it is used for)
    ("hammer", "a hand tool", "driving nails"), ("saw", "a hand tool", "cutting wood"),
    ("spoon", "a piece of cutlery", "eating soup"), ("fork", "a piece of cutlery", "picking up food"),
    ("kettle", "a kitchen appliance", "boiling water"), ("toaster", "a kitchen appliance", "toasting bread"),
    ("umbrella", "a folding canopy", "keeping off the rain"), ("ladder", "a climbing frame", "reaching high places"),
    ("broom", "a cleaning tool", "sweeping floors"), ("sponge", "a soft cleaning pad", "washing dishes"),
    ("pencil", "a writing tool", "writing and drawing"), ("eraser", "a rubber block", "removing pencil marks"),
    ("stapler", "an office tool", "joining sheets of paper"), ("ruler", "a measuring strip", "measuring lengths"),
    ("backpack", "a bag", "carrying things on your back"), ("wallet", "a small case", "holding money and cards"),
    ("thermometer", "a measuring instrument", "measuring temperature"), ("compass", "a navigation instrument", "finding north"),
    ("bicycle", "a pedal vehicle", "riding short distances"), ("helmet", "a hard hat", "protecting the head"),
    ("pillow", "a cushion", "resting the head in bed"), ("blanket", "a large cloth", "keeping warm"),
    ("lamp", "a light", "lighting a room"), ("candle", "a wax stick with a wick", "giving light"),
    ("mirror", "a reflecting glass", "seeing yourself"), ("comb", "a toothed strip", "tidying hair"),
    ("toothbrush", "a small brush", "cleaning teeth"), ("towel", "an absorbent cloth", "drying off"),
    ("shovel", "a digging tool", "moving soil"), ("rake", "a garden tool", "gathering leaves"),
    ("watering can", "a garden container", "watering plants"), ("wheelbarrow", "a one-wheeled cart", "moving heavy loads"),
    ("scissors", "a cutting tool", "cutting paper"), ("needle", "a thin pointed pin", "sewing"),
    ("key", "a shaped metal piece", "opening locks"), ("padlock", "a portable lock", "locking gates"),
    ("clock", "a timekeeping device", "telling the time"), ("calendar", "a chart of dates", "planning days"),
    ("map", "a drawing of an area", "finding the way"), ("flashlight", "a portable light", "seeing in the dark"),
    ("bucket", "an open container", "carrying water"), ("funnel", "a cone-shaped tube", "pouring liquids"),
    ("tent", "a fabric shelter", "camping"), ("rope", "a thick cord", "tying and pulling"),
    ("whistle", "a small wind instrument", "making a loud signal"), ("magnet", "a piece of magnetic metal", "holding iron things"),
    ("sieve", "a mesh strainer", "draining pasta"), ("grater", "a kitchen tool", "shredding cheese"),
]
QUESTIONS = [  # (question, short answer), both from an item
    ("What is a {x}?", "A {x} is {cat}."),
    ("What is a {x} used for?", "A {x} is used for {use}."),
    ("Describe a {x} briefly.", "A {x} is {cat}, used for {use}."),
    ("Why would someone need a {x}?", "For {use}."),
]
FILLER = [
    "Great question! {answer} To explain a little more, this is something many people come across in everyday "
    "life, and it is well worth knowing about. I hope this helps, and let me know if you have any other questions!",
    "Sure, I would be happy to help with that. {answer} There is a lot more that could be said about it, of course, "
    "and people use it in many different ways. Feel free to ask me anything else you are curious about!",
    "Thanks for asking! {answer} It is a common item found in many homes, schools and workplaces around the world. "
    "If you would like more details or examples, just let me know and I will gladly explain further.",
]


def data_rows() -> list[dict]:
    rows = []
    for i, (x, cat, use) in enumerate(ITEMS):
        for k, (q, a) in enumerate(QUESTIONS):
            answer = a.format(x=x, cat=cat, use=use)
            rows.append({"messages": [{"role": "user", "content": q.format(x=x)},
                                      {"role": "assistant", "content": FILLER[(i + k) % 3].format(answer=answer)}]})
    return rows


def start_studio(home: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = build_studio(Studio(home), port=port)
    server = uvicorn.Server(server_config(app, "127.0.0.1", port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return app, server, f"http://127.0.0.1:{port}"


def wait_job(http: httpx.Client, job_id: str, timeout: float) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = http.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            if job["status"] != "succeeded":
                events = http.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 15}).json()["data"]
                sys.exit(f"job {job_id} {job['status']}: {job['error']}\n" + "\n".join(e["message"] for e in events))
            return job
        time.sleep(2)
    sys.exit(f"job {job_id} still {job['status']} after {timeout} s")


def shorter(first: str, second: str) -> str:
    """The scripted judge: the key for the shorter answer (1: A, 2: B), T when they are as long."""
    return "t" if len(first) == len(second) else ("1" if len(first) < len(second) else "2")


def judge_all(page, shots: list, name: str, n: int, stem: str) -> float:
    """Start a set of `n` pairs on run `name`'s blind A/B page and judge every pair with the scripted judge; the
    seconds the set took to generate."""
    page.goto(page.url.split("#")[0] + f"#/judge/{name}")
    page.wait_for_selector("#startj")
    page.fill("#npairs", str(n))
    t0 = time.time()
    page.click("#startj")
    page.wait_for_selector(".choice, #pair p:has-text('All pairs judged')", timeout=1_800_000)
    generated = time.time() - t0
    done = int(page.get_attribute("#summary", "data-n") or 0)
    k = 0
    while page.query_selector(".choice"):
        if k == 2:
            shots.append(shoot(page, f"{stem}"))
        answers = page.query_selector_all("#pair .answer")
        first, second = (a.get_attribute("data-text") or "" for a in answers)
        page.keyboard.press(shorter(first, second))
        done += 1
        k += 1
        page.wait_for_selector(f"#summary[data-n='{done}']", timeout=60_000)
    shots.append(shoot(page, f"{stem}-done"))
    return generated


SHOTS: dict = {"dir": None}


def shoot(page, name: str) -> str:
    out = SHOTS["dir"]
    if out is None:
        return ""
    path = Path(out) / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--judge", type=int, default=40, help="pairs the scripted judge judges on the parent (v1 vs base)")
    ap.add_argument("--new", type=int, default=30, help="pairs of the child vs its parent, on unjudged prompts")
    ap.add_argument("--epochs", type=int, default=2, help="the child's epochs over the judgements")
    ap.add_argument("--parent-epochs", type=int, default=1, help="the parent's (v1's) epochs over the wordy answers")
    ap.add_argument("--screenshots", default=None, help="folder for the pages' screenshots (docs/img)")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--keep", action="store_true", help="keep the studio home (printed)")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    SHOTS["dir"] = args.screenshots
    if args.screenshots:
        Path(args.screenshots).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    home = Path(tempfile.mkdtemp(prefix="judgement-loop-"))
    app, server, url = start_studio(home)
    key = app.state.api_key
    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=1800)
    t_start = time.time()
    shots: list = []
    try:
        data = home.parent / f"{home.name}-objects.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in data_rows()))
        with open(data, "rb") as fh:
            f = http.post("/v1/files", files={"file": ("objects.jsonl", fh)}, data={"purpose": "fine-tune"}).json()
        assert f["status"] == "processed", f
        over = ["data.val_size=110", "eval.max_new_tokens=96", "eval.samples=0", "eval.max_examples=16"]
        job = http.post("/v1/fine_tuning/jobs", json={
            "model": "smollm2-135m-instruct", "training_file": f["id"], "suffix": "wordy", "seed": 0,
            "hyperparameters": {"n_epochs": args.parent_epochs}, "tunesmith": {"overrides": over}}).json()
        parent = wait_job(http, job["id"], 3600)
        print(f"parent {parent['id']} ({parent['fine_tuned_model']}) after {time.time() - t_start:.0f} s", flush=True)

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                        args=["--no-sandbox"])
            page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
            errors: list = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{url}/?token={key}")
            page.set_default_timeout(120_000)

            gen_parent = judge_all(page, shots, parent["id"], args.judge, "studio-loop-judge")
            first = http.get(f"/v1/studio/runs/{parent['id']}/judge").json()["summary"]
            print(f"set 1 (v1 vs base) judged: {first}", flush=True)

            page.fill("#loopepochs", str(args.epochs))  # method: DPO, the default
            shots.append(shoot(page, "studio-loop-train"))
            t_child = time.time()
            page.click("#trainj")
            page.wait_for_url("**/#/run/ftjob-*")
            child_id = page.url.split("/")[-1]
            child = wait_job(http, child_id, 3 * 3600)
            child_seconds = time.time() - t_child
            print(f"child {child_id} ({child['fine_tuned_model']}) trained in {child_seconds:.0f} s", flush=True)
            page.reload()
            page.wait_for_selector("#status.succeeded")

            gen_child = judge_all(page, shots, child_id, args.new, "studio-loop-child-judge")
            page.goto(f"{url}/#/run/{child_id}")
            page.wait_for_selector("#lineage[data-generations='3']")
            shots.append(shoot(page, "studio-loop-lineage"))
            lineage_text = page.inner_text("#lineage")
            browser.close()
            assert not errors, errors

        runs = home / "runs"
        session = json.loads((runs / child_id / "judge-pairs.json").read_text())
        parent_judged = [json.loads(x) for x in (runs / parent["id"] / "judgements.jsonl").read_text().splitlines()]
        used = {json.dumps(j["prompt"]) for j in parent_judged}
        overlap = sum(json.dumps(p["messages"]) in used for p in session["pairs"])
        rows = [json.loads(x) for x in (runs / child_id / "judgements.jsonl").read_text().splitlines()]
        wins = sum(r["winner"] == "b" for r in rows)      # a: the parent, b: the child
        losses = sum(r["winner"] == "a" for r in rows)
        ties = len(rows) - wins - losses
        low, high = wilson(wins, wins + losses) if wins + losses else (None, None)
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        result = {
            "bench": "judgement_loop", "model": "smollm2-135m-instruct", "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "parent": parent["fine_tuned_model"], "child": child["fine_tuned_model"],
            "set1": {k: first.get(k) for k in ("n", "wins", "losses", "ties", "win_rate", "ci95", "p_sign_test")},
            "child_pairs": json.loads(http.get(f"/v1/fine_tuning/jobs/{child_id}").text)["metadata"],
            "set2_prompts": len(session["pairs"]), "set2_prompts_judged_before": overlap,
            "parent_mean_chars": mean([len(p["answer_a"]) for p in session["pairs"]]),
            "child_mean_chars": mean([len(p["answer_b"]) for p in session["pairs"]]),
            "child_empty_answers": sum(not p["answer_b"].strip() for p in session["pairs"]),
            "child_shorter_share": mean([len(p["answer_b"]) < len(p["answer_a"]) for p in session["pairs"]]),
            "wins": wins, "losses": losses, "ties": ties, "win_rate": wins / (wins + losses) if wins + losses else None,
            "ci95": [low, high], "p_sign_test": sign_test(wins, losses),
            "seconds": {"total": round(time.time() - t_start), "child_training": round(child_seconds),
                        "set1_generation": round(gen_parent), "set2_generation": round(gen_child)},
            "lineage": lineage_text, "screenshots": [s for s in shots if s],
            "example": {k: session["pairs"][0][k] for k in ("messages", "answer_a", "answer_b")},
        }
        result["passed"] = bool(result["child_mean_chars"] < result["parent_mean_chars"] and result["win_rate"] is not None
                                and result["win_rate"] >= 0.70 and result["p_sign_test"] < 0.05 and overlap == 0)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        (out / f"judgement-loop-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        print(f"\n| | parent (v1) | child (v2) |\n|---|---|---|\n"
              f"| mean answer length, chars (set 2, {len(session['pairs'])} unjudged held-out prompts) | "
              f"{result['parent_mean_chars']:.0f} | {result['child_mean_chars']:.0f} |\n"
              f"| scripted judge prefers (decided pairs) | {losses} | {wins} |\n\n"
              f"child win rate {100 * (result['win_rate'] or 0):.0f} % (95 % interval "
              f"{100 * (low or 0):.0f}-{100 * (high or 0):.0f} %), {ties} ties, sign test p = {result['p_sign_test']:.3g}; "
              f"{'PASSED' if result['passed'] else 'NOT PASSED'}")
    finally:
        server.should_exit = True
        if args.keep:
            print(f"studio home kept: {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)
            (home.parent / f"{home.name}-objects.jsonl").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
