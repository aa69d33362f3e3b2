"""The studio's web page in a real browser: Debian's headless Chromium driven by Playwright (pointed at
/usr/bin/chromium; nothing downloads a browser), on a tiny model. Each test saves a screenshot of the page it checked
into its output folder (and into $TUNESMITH_SCREENSHOTS when set: docs/studio.md's pictures come from there)."""
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import write_jsonl
from test_studio import Running, chat_rows, upload, wait

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_model_dir):
    s = Running(tmp_path_factory.mktemp("studio-ui"), models_dirs=(tiny_model_dir.parent,))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "the browser tests need Debian's chromium (make setup installs it: apt-get install chromium)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, studio):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    pg = context.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(f"{studio.url}/?token={studio.key}")  # as `tunesmith studio` prints it: the token becomes a cookie
    assert pg.url == f"{studio.url}/"             # and leaves the address bar
    yield pg
    context.close()
    assert not errors, errors  # no script error on any page


def shot(page, tmp_path, name):
    page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
    if os.environ.get("TUNESMITH_SCREENSHOTS"):
        out = Path(os.environ["TUNESMITH_SCREENSHOTS"])
        out.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out / f"{name}.png"), full_page=True)


def points(page) -> int:
    return int(page.get_attribute("#loss", "data-points") or 0)


FAST = "eval.samples=1\neval.max_new_tokens=4\neval.max_examples=4\ntrain.lr=1e-2\n"


def test_launch_watch_stop_refresh_resume_finish(page, studio, tmp_path, tiny_model_dir):
    page.goto(f"{studio.url}/#/new")
    page.set_input_files("#upload", str(write_jsonl(tmp_path / "chat.jsonl", chat_rows(24))))
    page.wait_for_selector("#uploadmsg .ok")
    assert "chat, 24 records" in page.inner_text("#uploadmsg")
    page.fill("#model", str(tiny_model_dir))

    page.fill("#overrides", "train.nope=1")  # a bad choice is refused on the form with the CLI's message
    page.click("#launch")
    page.wait_for_selector("#formerror:not(:empty)")
    assert "train.nope" in page.inner_text("#formerror") and page.url.endswith("#/new")

    page.fill("#overrides", FAST + "train.max_steps=600\ntrain.save_every_steps=10")
    page.click("#inspect")
    page.wait_for_selector("#preview mark")  # the trained spans, highlighted
    assert "data: chat.jsonl\nformat: chat (detected)\nrecords: 24" in page.inner_text("#preview")
    page.click("#plan")
    page.wait_for_function("document.querySelector('#planout')?.textContent.includes('fits')")
    shot(page, tmp_path, "new-run")

    page.click("#launch")
    page.wait_for_url("**/#/run/ftjob-*")
    run = page.url.split("/")[-1]
    try:
        # a job's process starts, loads the model and evaluates before its first step: >30 s on a busy 2-core machine
        page.wait_for_function("Number(document.querySelector('#loss')?.dataset.points || 0) >= 3", timeout=120_000)
    except Exception:
        print("DEBUG", page.inner_text("body"))
        print("EVENTS", [e.message for e in studio.client().fine_tuning.jobs.list_events(run, limit=30)])
        raise
    first = points(page)
    page.wait_for_function(f"Number(document.querySelector('#loss')?.dataset.points || 0) > {first}")  # it grows live
    assert "step" in page.inner_text("#progress")
    shot(page, tmp_path, "run-live")

    page.click("#stop")
    page.wait_for_selector("#resume:not([hidden])", timeout=120_000)
    assert page.inner_text("#status") == "paused"
    stopped_at = points(page)

    page.reload()  # a refreshed tab shows the whole history
    page.wait_for_function(f"Number(document.querySelector('#loss')?.dataset.points || 0) >= {stopped_at}")
    assert "Fine-tuning job paused (checkpoint at step" in page.inner_text("#log")

    page.click("#resume")
    page.wait_for_function(f"Number(document.querySelector('#loss')?.dataset.points || 0) > {stopped_at + 2}",
                           timeout=120_000)
    page.wait_for_function("document.querySelector('#status')?.textContent === 'succeeded'", timeout=240_000)
    assert points(page) >= 600 and "New fine-tuned model created" in page.inner_text("#log")
    shot(page, tmp_path, "run-finished")

    page.select_option("#format", "hf")
    page.click("#export")
    page.wait_for_selector("#download", timeout=120_000)
    with page.expect_download() as d:
        page.click("#download")
    assert d.value.suggested_filename == f"{run}-hf.zip"


def test_runs_compare_playground_and_blind_judging(page, studio, tmp_path, tiny_model_dir):
    c = studio.client()
    f = upload(c, write_jsonl(tmp_path / "chat.jsonl", chat_rows(24)))
    jobs = [c.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=f.id, seed=k,
                                      extra_body={"tunesmith": {"overrides": FAST.split() + ["train.max_steps=4", "data.val_size=4"]}})
            for k in range(2)]
    jobs = [wait(c, j.id, lambda x: x.status in ("succeeded", "failed"))[0] for j in jobs]
    assert all(j.status == "succeeded" for j in jobs)
    names = [j.id for j in jobs]

    page.goto(f"{studio.url}/#/runs")
    page.wait_for_selector("#runtable")
    for n in names:
        assert page.inner_text(f"tr[data-run='{n}'] .status") == "succeeded"
        page.check(f"tr[data-run='{n}'] .pick")
    shot(page, tmp_path, "runs")
    page.click("#compare")
    page.wait_for_selector("#cmp[data-traces='4']")
    assert "eval_loss" in page.inner_text("#cmptable")
    shot(page, tmp_path, "compare")

    page.goto(f"{studio.url}/#/playground")
    page.wait_for_selector("#ma")
    page.select_option("#ma", tiny_model_dir.name)  # /v1/models lists ids, not server paths
    page.select_option("#mb", jobs[0].fine_tuned_model)
    page.fill("#prompt", "Say 3.")
    page.fill("#maxt", "8")
    page.press("#prompt", "Control+Enter")
    page.wait_for_selector("#aa[data-done='1']")
    page.wait_for_selector("#ab[data-done='1']")
    shot(page, tmp_path, "playground")

    page.goto(f"{studio.url}/#/judge/{names[0]}")
    page.fill("#npairs", "3")
    page.click("#startj")
    page.wait_for_selector(".choice", timeout=120_000)
    shot(page, tmp_path, "judge")
    for k, key in enumerate(["1", "2", "t"]):
        page.keyboard.press(key)
        try:
            page.wait_for_selector(f"#summary[data-n='{k + 1}']", timeout=5000)
        except Exception:
            print("DEBUG", k, page.inner_text("body"))
            raise
    assert "All pairs judged" in page.inner_text("#pair")
    assert "win rate" in page.inner_text("#summary") or "all ties" in page.inner_text("#summary")
    run = studio.app.state.runner.run_dir(names[0])
    lines = [json.loads(x) for x in (run.path / "judgements.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and {x["winner"] for x in lines} <= {"a", "b", "tie"} and lines[2]["winner"] == "tie"
    assert lines[0]["winner"] == lines[0]["shown_first"]  # "1" picked the answer shown first, whichever model it was
    assert "Human evaluation (blind A/B)" in run.report.read_text()
    shot(page, tmp_path, "judge-done")
    with page.expect_download() as d:
        page.click("#exportj")
    assert len(Path(d.value.path()).read_text().splitlines()) == 3


def test_a_page_left_before_its_data_came_is_not_drawn_over_the_next(page, studio):
    """route()'s navigation token: the runs page's answer, held back until the user has moved on to the playground
    and it has drawn, is dropped when it comes (was: the slow runs table was drawn over the playground)."""
    page.wait_for_selector("#runtable")  # the first page has drawn
    page.evaluate("location.hash = '#/playground'")
    page.wait_for_selector("#prompt")
    held = []
    page.route("**/v1/studio/runs", lambda route: held.append(route))
    page.evaluate("location.hash = '#/runs'")
    for _ in range(300):
        if held:
            break
        page.wait_for_timeout(100)
    assert held, "the runs page asked for its runs"
    page.evaluate("location.hash = '#/playground'")
    page.wait_for_selector("#prompt")
    with page.expect_response("**/v1/studio/runs"):
        held[0].continue_()
    page.unroute("**/v1/studio/runs")  # after: unroute itself lets a held request go
    page.wait_for_timeout(500)
    assert page.query_selector("#runtable") is None and page.query_selector("#prompt") is not None
    assert page.get_attribute("#main", "data-page") == "playground"
