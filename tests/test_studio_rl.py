"""Online RL in the studio (studio/routers/rl.py, static/rl.js): what HTTP may ask of RL (no Python reward without
--allow-code, at the headroom check as at launch), the headroom check before a launch, a run's RL numbers with the
alarms evaluate/alarms.py raises over them, and in a real browser (Debian's Chromium via Playwright, as
test_studio_ui.py): a GRPO run launched from the New-run form draws its reward curves live, and a run built to drift
(a length reward with no upper bound, after a warm-up that taught short answers) raises the length alarm."""
import json
from pathlib import Path

import openai
import pytest

from conftest import write_jsonl
from test_studio import Running, upload
from test_studio_ui import browser, shot  # noqa: F401  (browser: a fixture)
from tunesmith.config import load_config
from tunesmith.train.loop import train

FAST = ["eval.samples=1", "eval.max_new_tokens=4", "eval.max_examples=4", "data.val_size=4"]


def number_prompts(n=24):
    return [{"prompt": f"What is {i} plus 1?", "answer": str(i + 1)} for i in range(n)]


@pytest.fixture(scope="module")
def runs_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("cli-runs")


@pytest.fixture(scope="module")
def drift_run(runs_folder, tiny_model_dir, tmp_path_factory):
    """A run built to drift: a warm-up that answers with 1-12 words ("ok ok ..."), then GRPO on a length reward whose
    band starts past the cap (min 16 words, no real upper bound): every longer answer scores more, so answers run to
    rl.max_new_tokens=16 (measured: 20-40 % cut in the first steps, ~100 % by step 24)."""
    data = tmp_path_factory.mktemp("drift-data")
    common = [f"output.dir={runs_folder}", "train.micro_batch_size=4", "eval.max_examples=8", "eval.samples=0",
              "eval.max_new_tokens=8", "data.val_size=8", "method.name=full", "method.freeze_embeddings=false",
              "train.lr=3e-2"]
    sft = write_jsonl(data / "sft.jsonl", [{"messages": [{"role": "user", "content": f"Say something about {i}."},
                                                        {"role": "assistant", "content": " ".join(["ok"] * (1 + i % 12))}]}
                                          for i in range(40)])
    warm = train(load_config(None, [f"model.name={tiny_model_dir}", f"data.path={sft}", "train.max_steps=80",
                                    "output.name=warmup", *common]))
    prompts = write_jsonl(data / "prompts.jsonl", [{"prompt": f"Say something about {i}."} for i in range(40)])
    res = train(load_config(None, [f"model.name={warm.run_dir}", f"data.path={prompts}", "task=rl", "train.max_steps=40",
                                   "rl.group_size=8", "rl.max_new_tokens=16", "rl.headroom_samples=0",
                                   "rl.rewards=[{kind: length, min_words: 16, max_words: 1000}]", "output.name=drift",
                                   *common]))
    return res.run_dir


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_model_dir, runs_folder):
    s = Running(tmp_path_factory.mktemp("studio-rl"), models_dirs=(tiny_model_dir.parent,), runs_dirs=(runs_folder,))
    yield s
    s.stop()


def test_rl_settings_over_http_are_held_to_the_operator_policy(studio, tmp_path, tiny_model_dir):
    c = studio.client()
    f = upload(c, write_jsonl(tmp_path / "prompts.jsonl", number_prompts()))
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(tmp_path / 'pwned')!r}, 'w').write('x')\ndef r(prompts, completions, **kw):\n"
                    f"    return [0.0] * len(completions)\n")
    # the form's shape of rl.rewards (JSON), a Python function among built-in rewards
    function = f'rl.rewards=[{{"kind": "numeric", "column": "answer"}}, {{"kind": "function", "path": "{evil}:r", "weight": 0.5}}]'

    options = studio.http.get("/v1/studio/options").json()["rl"]
    assert "function" not in [k["kind"] for k in options["reward_kinds"]] and options["allow_code"] is False
    assert {"numeric", "exact", "regex", "length", "rouge", "countdown"} <= {k["kind"] for k in options["reward_kinds"]}

    with pytest.raises(openai.BadRequestError) as e:  # at launch
        c.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=f.id,
                                  extra_body={"tunesmith": {"overrides": ["task=rl", function]}})
    assert e.value.code == "override_not_allowed" and "rl.rewards[1]" in e.value.message and "--allow-code" in e.value.message
    r = studio.http.post("/v1/studio/headroom", json={"model": str(tiny_model_dir), "training_file": f.id,
                                                      "overrides": ["task=rl", function], "prompts": 2, "samples": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "override_not_allowed"  # and before a launch
    assert str(tmp_path) not in r.text and not (tmp_path / "pwned").exists()
    # a reward model outside the operator's --models folders is refused the same way
    with pytest.raises(openai.BadRequestError) as e:
        c.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=f.id, extra_body={"tunesmith": {"overrides": [
            "task=rl", f'rl.rewards=[{{"kind": "model", "path": "{tmp_path}"}}]']}})
    assert e.value.code == "override_not_allowed" and "--models" in e.value.message and str(tmp_path) not in e.value.message
    # bounded work: at most 16 prompts x 16 samples per headroom check
    too_many = studio.http.post("/v1/studio/headroom", json={"model": str(tiny_model_dir), "training_file": f.id,
                                                             "overrides": ["task=rl"], "prompts": 17, "samples": 2})
    assert too_many.status_code in (400, 422)

    # the operator's --allow-code opens function rewards (offered on the form, accepted at launch)
    opened = Running(tmp_path / "open-home", models_dirs=(tiny_model_dir.parent,), allow_code=True)
    try:
        assert "function" in [k["kind"] for k in opened.http.get("/v1/studio/rl/options").json()["reward_kinds"]]
        oc = opened.client()
        g = upload(oc, write_jsonl(tmp_path / "p2.jsonl", number_prompts()))
        job = oc.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=g.id, extra_body={"tunesmith": {
            "overrides": ["task=rl", function, "train.max_steps=1"]}})
        assert job.status == "validating_files"
        oc.fine_tuning.jobs.cancel(job.id)
    finally:
        opened.stop()


def test_a_reward_model_job_takes_preference_pairs(studio, tmp_path, tiny_model_dir):
    """task=reward from the form (method supervised + the task override) on an uploaded pair file is a job, not a
    'use method dpo' refusal."""
    c = studio.client()
    pairs = [{"prompt": f"Say something about {i}.", "chosen": f"Yes, {i} is fine.", "rejected": "No."} for i in range(16)]
    f = upload(c, write_jsonl(tmp_path / "pairs.jsonl", pairs))
    job = c.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=f.id, method={"type": "supervised"},
                                    extra_body={"tunesmith": {"overrides": ["task=reward", "train.max_steps=1"]}})
    assert job.status == "validating_files"
    c.fine_tuning.jobs.cancel(job.id)


def test_a_reward_model_run_of_the_studio_is_an_rl_reward(studio, tmp_path, tiny_model_dir):
    """The studio's own finished reward-model run, named `runs/NAME` (where jobs run), is offered and accepted as a
    `model` reward -- at the headroom check, which scores samples with it, and at launch -- with no --models folder."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"What is {i} plus 1?", "chosen": f"{i + 1}",
                                                    "rejected": "No."} for i in range(24)])
    train(load_config(None, [f"model.name={tiny_model_dir}", f"data.path={pairs}", "task=reward", "method.name=full",
                             "train.max_steps=4", "data.val_size=4", "eval.max_examples=4",
                             f"output.dir={studio.app.state.home / 'runs'}", "output.name=rm"]))
    assert "runs/rm" in studio.http.get("/v1/studio/rl/options").json()["reward_runs"]
    c = studio.client()
    f = upload(c, write_jsonl(tmp_path / "prompts.jsonl", number_prompts()))
    reward = 'rl.rewards=[{"kind": "model", "path": "runs/rm"}]'
    r = studio.http.post("/v1/studio/headroom", json={"model": str(tiny_model_dir), "training_file": f.id, "prompts": 2,
                                                      "samples": 2, "overrides": ["task=rl", reward, "rl.max_new_tokens=4"]})
    assert r.status_code == 200, r.text
    assert r.json()["headroom"]["rewards"]["model"]["binary"] is False  # a score: best-of-K against greedy
    job = c.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=f.id,
                                    extra_body={"tunesmith": {"overrides": ["task=rl", reward, "train.max_steps=1"]}})
    assert job.status == "validating_files"
    c.fine_tuning.jobs.cancel(job.id)
    with pytest.raises(openai.BadRequestError):  # a name outside the studio's runs is not a run of it
        c.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=f.id, extra_body={"tunesmith": {
            "overrides": ["task=rl", 'rl.rewards=[{"kind": "model", "path": "runs/../runs/rm"}]']}})


def test_headroom_before_launch_is_pass_at_1_against_pass_at_k(studio, tmp_path, tiny_model_dir):
    c = studio.client()
    f = upload(c, write_jsonl(tmp_path / "prompts.jsonl", number_prompts()))
    rewards = json.dumps([{"kind": "numeric", "column": "answer"}, {"kind": "regex", "pattern": "[a-z]", "weight": 0.2}])
    r = studio.http.post("/v1/studio/headroom", json={
        "model": str(tiny_model_dir), "training_file": f.id, "prompts": 4, "samples": 4,
        "overrides": ["task=rl", f"rl.rewards={rewards}", "rl.max_new_tokens=6", "data.val_size=6"]})
    assert r.status_code == 200, r.text
    h = r.json()
    assert h["prompts"] == 4 and h["samples"] == 4 and h["max_new_tokens"] == 6
    numeric = h["headroom"]["rewards"]["numeric"]
    assert numeric["binary"] and 0 <= numeric["pass@1"] <= numeric["pass@4"] <= 1
    assert "pass@4" in h["text"] and str(tmp_path) not in r.text
    # the tiny random model never writes the right number: the check says so before anything is launched
    assert numeric["pass@4"] == 0 and any("warm up with SFT" in w for w in h["warnings"])


def test_a_runs_rl_numbers_and_alarms(studio, drift_run, tiny_model_dir):
    r = studio.http.get("/v1/studio/runs/drift/rl")
    assert r.status_code == 200
    data = r.json()
    assert data["task"] == "rl" and data["finished"] and data["settings"]["max_new_tokens"] == 16
    steps = [row for row in data["rows"] if "reward" in row]
    assert len(steps) == 40 and {"rewards/length/mean", "clipped_ratio", "completion_length", "frac_reward_zero_std"} <= set(steps[0])
    assert any("clip_ratio" in s and "entropy" in s for s in steps)  # (a step whose groups were all flat runs no pass)
    first, last = (sum(s["clipped_ratio"] for s in part) / 3 for part in (steps[:3], steps[-3:]))
    assert first < 0.5 < 0.9 < last  # it drifted to the cap
    kinds = {a["kind"]: a for a in data["alarms"]}
    assert "length_at_cap" in kinds and "in the first steps" in kinds["length_at_cap"]["message"]
    log = (Path(drift_run) / "train.log").read_text()  # the CLI's train.log says each alarm once, as it rises
    said = [line for line in log.splitlines() if line.startswith("warning (step")]
    assert len(said) == len({line.split("): ")[1] for line in said}) and any("cap" in line for line in said), log[-2000:]
    assert [c["title"] for c in data["shows"]["charts"]][0].startswith("reward")
    # a run that is not RL has no RL numbers; an unknown run is a 404
    warm = studio.http.get("/v1/studio/runs/warmup/rl").json()
    assert warm["task"] != "rl" and warm["rows"] == [] and warm["alarms"] == []
    assert studio.http.get("/v1/studio/runs/nope/rl").status_code == 404


# ---------------------------------------------------------------- in the browser

@pytest.fixture
def page(browser, studio):  # noqa: F811
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(f"{studio.url}/?token={studio.key}")
    yield pg
    context.close()
    assert not errors, errors


def test_grpo_launched_from_the_form_draws_its_rewards_and_a_drifting_run_raises_its_alarm(
        page, studio, tmp_path, tiny_model_dir, drift_run):
    page.goto(f"{studio.url}/#/new")
    page.set_input_files("#upload", str(write_jsonl(tmp_path / "numbers.jsonl", number_prompts(40))))
    page.wait_for_selector("#uploadmsg .ok")
    page.fill("#model", str(tiny_model_dir))
    page.select_option("#objective", "rl")
    assert page.is_visible("#rlbox")
    page.fill("#rlgroup", "4")
    page.fill("#rlbeta", "0.04")
    page.fill("#rlcap", "8")
    page.click("#rladd")  # numeric on `answer` (the form's first row) plus a format reward
    page.fill("#rlrewards tr.rlreward:nth-child(2) .rfield", "[0-9]")
    page.fill("#rlrewards tr.rlreward:nth-child(2) .rweight", "0.5")
    page.fill("#overrides", "\n".join(FAST + ["train.max_steps=30", "method.name=full", "method.freeze_embeddings=false",
                                              "rl.headroom_examples=4", "rl.headroom_samples=4"]))
    page.fill("#hrprompts", "4")
    page.fill("#hrsamples", "4")
    page.click("#headroom")
    page.wait_for_selector("#headroomout[data-done='1']", timeout=120_000)
    assert "pass@4" in page.inner_text("#headroomout")
    shot(page, tmp_path, "studio-rl-new-run")

    page.click("#launch")
    page.wait_for_url("**/#/run/ftjob-*")
    page.wait_for_selector("#rlpanel:not([hidden])", timeout=120_000)  # rl.js polls: it appears once the run has a config
    page.reload()  # the grid's charts are chosen at page load from the task's declaration: read it now the run has one
    try:  # the main chart is the reward, growing live: total, per reward (numeric, regex), held-out
        page.wait_for_function("Number(document.querySelector('#loss')?.dataset.points || 0) >= 4", timeout=180_000)
        page.wait_for_function("Number(document.querySelector('#rlchart0')?.dataset.points || 0) >= 4", timeout=30_000)
    except Exception:
        print("DEBUG", page.inner_text("body"))
        raise
    lines = page.evaluate("document.getElementById('loss').data.map(t => t.name)")
    assert {"total", "numeric", "regex"} <= set(lines), lines
    titles = page.eval_on_selector_all("#rlcharts .chart", "els => els.map(e => e.dataset.title)")
    assert any("length" in t for t in titles) and any("KL" in t for t in titles) and any("share" in t for t in titles)
    shares = page.get_attribute([f"#rlchart{i}" for i, t in enumerate(titles) if "share" in t][0], "data-traces")
    assert "answers cut at the cap" in shares and "tokens clipped by the surrogate" in shares
    kl = page.get_attribute([f"#rlchart{i}" for i, t in enumerate(titles) if "KL" in t][0], "data-traces")
    assert "KL to the reference" in kl and "entropy" in kl  # rl.beta = 0.04: the KL is logged and drawn
    assert "grpo, 4 answers per prompt, KL weight 0.04, cap 8 tokens" in page.inner_text("#rlsettings")
    shot(page, tmp_path, "studio-rl-run")

    page.goto(f"{studio.url}/#/run/drift")  # the run built to drift
    page.wait_for_selector(".alarm[data-kind='length_at_cap']", timeout=30_000)
    text = page.inner_text(".alarm[data-kind='length_at_cap']")
    assert "answers at the length cap" in text and "rl.max_new_tokens=16" in text
    page.locator("#rlpanel").scroll_into_view_if_needed()
    shot(page, tmp_path, "studio-rl-alarm")
