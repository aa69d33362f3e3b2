"""The judgement loop in the studio, on a tiny model (the same loop on SmolLM2, with a scripted judge whose child is
measured, is bench/judgement_loop.py): a run's blind A/B page names models by their ids; judgements are imported
(checked line by line, merged without losing any); *Train on these judgements* (the page's button, in Chromium) starts
a child job from the judged model whose config records its parent and the judgements it learned from; the child's
new set of pairs is child vs parent on held-out prompts no judgement used; the run page shows the lineage with each
generation's record against its parent."""
import json

import pytest

from conftest import write_jsonl
from test_studio import Running, chat_rows, upload, wait
from test_studio_ui import CHROMIUM, shot
from tunesmith.config import load_config, read_yaml
from tunesmith.data.prepare import heldout_prompts
from tunesmith.evaluate.lineage import lineage

FAST = ["eval.samples=0", "eval.max_new_tokens=6", "eval.max_examples=4", "train.lr=1e-2"]


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_model_dir):
    s = Running(tmp_path_factory.mktemp("studio-loop"), models_dirs=(tiny_model_dir.parent,))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def parent(studio, tiny_model_dir, tmp_path_factory):
    """A finished job on the tiny model (given by its path, as a --models model may be) with 20 prompts held out."""
    c = studio.client()
    f = upload(c, write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", chat_rows(36)))
    job = c.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=f.id,
                                    extra_body={"tunesmith": {"overrides": FAST + ["train.max_steps=2", "data.val_size=20"]}})
    job, seen = wait(c, job.id, lambda j: j.status in ("succeeded", "failed"))
    assert job.status == "succeeded", seen
    return job


def judgement(prompt: list, a: str, b: str, winner: str, k: int) -> dict:
    """One line as a studio writes it; a terse answer vs a padded one."""
    terse = prompt[-1]["content"].split()[-1].rstrip(".")
    answers = (terse, terse + " and a long note about it") if winner == "a" else (terse + " and a long note about it", terse)
    return {"session": 1, "index": k, "prompt": prompt, "reference": terse, "a": a, "b": b, "answer_a": answers[0],
            "answer_b": answers[1], "winner": winner, "shown_first": "a", "at": 1_700_000_000 + k}


def test_the_loop_from_judgements_to_a_child_judged_against_its_parent(studio, parent, tiny_model_dir, tmp_path, browser):
    http, run = studio.http, parent.id
    home = str(studio.app.state.home)

    # the blind A/B page names the base by its model id, never by its server path
    state = http.post(f"/v1/studio/runs/{run}/judge", json={"n": 3}).json()
    assert len(state["pairs"]) == 3
    first = [http.post(f"/v1/studio/runs/{run}/judge/{i}", json={"choice": "tie"}).json() for i in range(3)][-1]
    assert first["summary"]["a"] == tiny_model_dir.name and first["summary"]["b"] == parent.fine_tuned_model
    assert str(tiny_model_dir) not in json.dumps(first)
    judged = [json.loads(x) for x in (studio.app.state.runner.run_dir(run).judgements).read_text().splitlines()]
    assert {j["a"] for j in judged} == {tiny_model_dir.name}

    # an import is checked line by line: one bad line and nothing is kept, with the file, line and field
    parent_dir = studio.app.state.runner.run_dir(run)
    held_out = [p["messages"] for p in heldout_prompts(load_config(str(parent_dir.config)).data, 1000)]
    first_set = json.loads((parent_dir.path / "judge-pairs.json").read_text())["pairs"]
    assert len(held_out) == 20 and [p["messages"] for p in first_set] == held_out[:3]
    rows = [judgement(p, tiny_model_dir.name, parent.fine_tuned_model, "a" if k % 2 == 0 else "b", k)
            for k, p in enumerate(held_out[3:11])]  # the shorter answer wins each time
    bad = "\n".join(json.dumps(r) for r in rows[:3]) + '\n{"a": "x", "b": "y", "winner": "left"}\n'
    r = http.post(f"/v1/studio/runs/{run}/judgements", json={"filename": "/home/x/alice.jsonl", "content": bad})
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "alice.jsonl:4: winner: expected \"a\", \"b\" or \"tie\"" in message and "nothing was imported" in message
    assert "/home/x" not in message
    assert len(http.get(f"/v1/studio/runs/{run}/judgements.jsonl").text.splitlines()) == 3

    good = "".join(json.dumps(r) + "\n" for r in rows)
    r = http.post(f"/v1/studio/runs/{run}/judgements", json={"filename": "alice.jsonl", "content": good}).json()
    assert (r["read"], r["imported"], r["already_there"], r["total"]) == (8, 8, 0, 11)
    r = http.post(f"/v1/studio/runs/{run}/judgements", json={"filename": "alice-again.jsonl", "content": good}).json()
    assert (r["imported"], r["already_there"], r["total"]) == (0, 8, 11)  # the same judgements merged once
    assert r["summary"]["n"] == 11 and r["summary"]["ties"] == 3

    # a child's settings go through the same checks as any job's: no server path over HTTP
    r = http.post(f"/v1/studio/runs/{run}/train-on-judgements", json={"overrides": ["data.path=/etc/passwd"]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "override_not_allowed"

    # *Train on these judgements*: the button on the blind A/B page, in a real browser
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{studio.url}/?token={studio.key}")
    page.wait_for_selector("#runtable")  # the first page has drawn (a page still loading would draw over the next)
    page.goto(f"{studio.url}/#/judge/{run}")
    try:
        page.wait_for_selector("#trainj")
    except Exception:
        print("DEBUG", page.url, page.inner_text("body"), errors)
        raise
    assert page.input_value("#loopmethod") == "dpo"  # DPO by default
    page.click("#trainj")
    page.wait_for_url("**/#/run/ftjob-*")
    child = page.url.split("/")[-1]
    assert child != run
    page.wait_for_selector("#lineagebox:not([hidden])")

    c = studio.client()
    job, seen = wait(c, child, lambda j: j.status in ("succeeded", "failed"), timeout=300)
    assert job.status == "succeeded", (seen, [e.message for e in c.fine_tuning.jobs.list_events(child, limit=20)])
    assert job.method.type == "dpo" and job.model == parent.fine_tuned_model and job.training_file is None
    assert job.metadata["judgements_of"] == run and job.metadata["pairs"] == "8"
    child_dir = studio.app.state.runner.run_dir(child)
    cfg = read_yaml(child_dir.config)
    assert cfg["task"] == "dpo" and cfg["model"]["name"] == str(parent_dir.path)  # its parent, recorded
    snapshot = (studio.app.state.home / "jobs" / child / "judgements.jsonl").resolve()  # what it learned from: the
    assert cfg["data"]["path"] == str(snapshot)                                 # parent's judgements when it was made
    assert snapshot.read_text() == parent_dir.judgements.read_text()
    assert [g.name for g in lineage(child_dir.path)] == [str(tiny_model_dir.resolve()), run, child]

    # the child's new set of pairs: child vs parent, on held-out prompts no judgement used
    state = http.post(f"/v1/studio/runs/{child}/judge", json={"n": 4}).json()
    session = json.loads((child_dir.path / "judge-pairs.json").read_text())
    assert (session["a"], session["b"]) == (parent.fine_tuned_model, job.fine_tuned_model)
    used = {json.dumps(j["prompt"]) for j in map(json.loads, parent_dir.judgements.read_text().splitlines())}
    assert len(session["pairs"]) == 4 and not used & {json.dumps(p["messages"]) for p in session["pairs"]}
    for i, winner in enumerate(["b", "b", "a", "tie"]):  # the child (b) wins twice, loses once; one tie
        shown = {"tie": "tie", session["pairs"][i]["first"]: "first"}.get(winner, "second")
        state = http.post(f"/v1/studio/runs/{child}/judge/{i}", json={"choice": shown}).json()
    assert (state["summary"]["wins"], state["summary"]["losses"], state["summary"]["ties"]) == (2, 1, 1)
    again = http.post(f"/v1/studio/runs/{child}/judge", json={"n": 100}).json()  # the rest: none judged before
    session2 = json.loads((child_dir.path / "judge-pairs.json").read_text())
    assert len(again["pairs"]) == 20 - 3 - 8 - 4 and not {json.dumps(p["messages"]) for p in session2["pairs"]} & (
        used | {json.dumps(p["messages"]) for p in session["pairs"]})

    # the alternative, reward model then GRPO: step 1 is a reward model on the same judgements (cancelled here)
    r = http.post(f"/v1/studio/runs/{run}/train-on-judgements", json={"method": "reward"}).json()
    assert "task=reward" in r["tunesmith"]["overrides"] and r["metadata"]["objective"] == "reward"
    assert r["judgements"]["pairs"] == 8 and r["judgements"]["file"] == f"runs/{run}/judgements.jsonl"
    http.post(f"/v1/fine_tuning/jobs/{r['id']}/cancel")

    # the run page: base -> v1 -> v2, each with its record against its parent
    lin = http.get(f"/v1/studio/runs/{child}/lineage").json()["data"]
    assert [g["model"] for g in lin] == [tiny_model_dir.name, parent.fine_tuned_model, job.fine_tuned_model]
    assert home not in json.dumps(lin) and str(tiny_model_dir) not in json.dumps(lin)
    v1, v2 = lin[1]["vs_parent"], lin[2]["vs_parent"]
    assert v1["wins"] + v1["losses"] == 8 and v1["ties"] == 3  # the imported 8 and the 3 ties, from v1's side
    assert (v2["wins"], v2["losses"], v2["ties"]) == (2, 1, 1) and v2["p_sign_test"] == 1.0
    assert v2["win_rate"] == pytest.approx(2 / 3) and v2["ci95"][0] < 2 / 3 < v2["ci95"][1]
    page.goto(f"{studio.url}/#/run/{child}")
    page.reload()  # the tab is on this page since the button: drawn again, with the judgements made since
    page.wait_for_selector("#lineage[data-generations='3']")
    base_row, v1_row, v2_row = (page.inner_text(f"#lineage tr[data-gen='{i}']") for i in range(3))
    assert base_row.split() == ["base", tiny_model_dir.name]
    assert v1_row.startswith("v1") and f"{100 * v1['win_rate']:.0f} %" in v1_row and "its training data" in v1_row
    assert v2_row.startswith("v2") and f"{100 * v2['win_rate']:.0f} %" in v2_row and f"judgements of {run}" in v2_row
    shot(page, tmp_path, "loop-lineage")
    context.close()
    assert not errors, errors
