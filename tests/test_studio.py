"""`tunesmith studio` driven by the official `openai` SDK (only base_url changed), on a tiny model: files, supervised
and DPO jobs, events (paginated and as a live stream), checkpoints, pause / resume / cancel, a restart, serving the
tuned model, and the errors a client gets."""
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from conftest import write_jsonl
from tunesmith.cli.main import main
from tunesmith.studio.app import Studio, build_studio, server_config


class Running:
    """A studio in a thread, configured as `tunesmith studio` runs it (server_config); `key` is its API key (made at
    its start unless given), and `http` an httpx client that sends it."""

    def __init__(self, home, **kw):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.app = build_studio(Studio(home, **kw), port=self.port)
        self.key = self.app.state.api_key
        self.server = uvicorn.Server(server_config(self.app, "127.0.0.1", self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"} if self.key else {},
                                 timeout=60)

    def client(self, key=None):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or self.key or "unused", max_retries=0)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=180)


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_model_dir):
    s = Running(tmp_path_factory.mktemp("studio"), models_dirs=(tiny_model_dir.parent,))
    yield s
    s.stop()


def chat_rows(n):
    return [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i} {i}"}]}
            for i in range(n)]


def dpo_rows(n):
    return [{"input": {"messages": [{"role": "user", "content": f"Say {i}."}]},
             "preferred_output": [{"role": "assistant", "content": f"{i} {i}"}],
             "non_preferred_output": [{"role": "assistant", "content": "no"}]} for i in range(n)]


def upload(client, path):
    with open(path, "rb") as fh:
        return client.files.create(file=fh, purpose="fine-tune")


def wait(client, job_id, until, timeout=240):
    deadline = time.time() + timeout
    seen = []
    while time.time() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if not seen or seen[-1] != job.status:
            seen.append(job.status)
        if until(job):
            return job, seen
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout} s; statuses {seen}; "
                         f"events {[e.message for e in client.fine_tuning.jobs.list_events(job_id, limit=10)]}")


def steps_of(client, job_id):
    return [e.data["step"] for e in client.fine_tuning.jobs.list_events(job_id, limit=1000).data
            if e.type == "metrics" and e.data and "train_loss" in e.data]


FAST = ["eval.samples=1", "eval.max_new_tokens=4", "eval.max_examples=4", "train.lr=1e-2"]


def test_supervised_job_from_upload_to_chat(studio, tmp_path, tiny_model_dir):
    c = studio.client()
    f = upload(c, write_jsonl(tmp_path / "train.jsonl", chat_rows(24)))
    assert f.status == "processed" and f.filename == "train.jsonl" and f.purpose == "fine-tune"
    assert c.files.retrieve(f.id).bytes == (tmp_path / "train.jsonl").stat().st_size
    assert c.files.content(f.id).read() == (tmp_path / "train.jsonl").read_bytes()
    assert f.id in [x.id for x in c.files.list()]

    job = c.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=f.id, suffix="say", seed=3,
                                    hyperparameters={"n_epochs": 2, "batch_size": 4},
                                    extra_body={"tunesmith": {"overrides": FAST}})
    assert job.status == "validating_files" and job.hyperparameters.n_epochs == 2 and job.seed == 3
    job, seen = wait(c, job.id, lambda j: j.status in ("succeeded", "failed", "cancelled"))
    assert job.status == "succeeded", job.error
    assert seen[0] in ("validating_files", "queued", "running") and "running" in seen
    assert job.fine_tuned_model == f"ft:{tiny_model_dir.name}:say:{job.id.split('-')[1][:12]}"
    assert job.trained_tokens > 0 and job.finished_at >= job.created_at

    events = c.fine_tuning.jobs.list_events(job.id, limit=1000).data
    messages = [e.message for e in events]
    assert messages[0] == f"New fine-tuned model created: {job.fine_tuned_model}"  # newest first, as OpenAI's
    assert messages[-1] == f"Created fine-tuning job: {job.id}"
    steps = steps_of(c, job.id)
    totals = {e.data["total_steps"] for e in events if e.type == "metrics" and e.data and "train_loss" in e.data}
    assert sorted(steps) == list(range(1, max(steps) + 1)) and totals == {max(steps)} and max(steps) >= 10  # 2 epochs
    page = c.fine_tuning.jobs.list_events(job.id, limit=3)
    more = c.fine_tuning.jobs.list_events(job.id, limit=3, after=page.data[-1].id)
    assert page.has_more and [e.id for e in page.data + more.data] == [e.id for e in events[:6]]

    ckpts = c.fine_tuning.jobs.checkpoints.list(job.id).data
    assert ckpts and ckpts[0].step_number >= ckpts[-1].step_number and "train_loss" in ckpts[0].metrics.to_dict()

    csv = c.files.content(job.result_files[0]).text.splitlines()
    assert csv[0].startswith("step,train_loss,valid_loss") and len(csv) >= 11

    assert job.fine_tuned_model in [m.id for m in c.models.list()]
    answer = c.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": "Say 3."}],
                                       max_tokens=6, temperature=0)
    assert answer.choices[0].message.content and answer.model == job.fine_tuned_model
    base = c.completions.create(model=str(tiny_model_dir), prompt="Say", max_tokens=3, temperature=0)
    assert base.choices[0].text is not None

    listed = c.fine_tuning.jobs.list(limit=1)
    assert listed.data[0].id == job.id


def test_dpo_job_with_an_openai_dpo_file(studio, tmp_path, tiny_model_dir):
    c = studio.client()
    f = upload(c, write_jsonl(tmp_path / "pairs.jsonl", dpo_rows(20)))
    assert f.status == "processed"
    job = c.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=f.id,
                                    method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1}}},
                                    extra_body={"tunesmith": {"overrides": FAST}})
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    job, _ = wait(c, job.id, lambda j: j.status in ("succeeded", "failed", "cancelled"))
    assert job.status == "succeeded", job.error
    run = studio.app.state.runner.run_dir(job.id)
    assert "beta: 0.2" in run.config.read_text() and "task: dpo" in run.config.read_text()
    answer = c.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": "Say 1."}],
                                       max_tokens=4)
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_bad_uploads_bad_requests_and_unknown_models_get_openai_errors(studio, tmp_path, tiny_model_dir):
    c = studio.client()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(chat_rows(1)[0]) + "\n" + json.dumps(chat_rows(1)[0]) + "\n{not json\n")
    f = upload(c, bad)
    assert f.status == "error" and f.status_details.startswith("bad.jsonl:3: not valid JSON")
    assert str(tmp_path) not in f.status_details and "studio" not in f.status_details  # no server path

    with pytest.raises(openai.BadRequestError) as e:
        c.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=f.id)
    assert e.value.code == "invalid_training_file" and e.value.param == "training_file"
    assert "bad.jsonl:3" in e.value.message

    good = upload(c, write_jsonl(tmp_path / "good.jsonl", chat_rows(10)))
    with pytest.raises(openai.BadRequestError) as e:
        c.fine_tuning.jobs.create(model="no-such-model", training_file=good.id)
    assert e.value.code == "model_not_available" and e.value.param == "model"
    with pytest.raises(openai.BadRequestError) as e:
        c.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=good.id, hyperparameters={"n_epochs": 0})
    assert "n_epochs" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        c.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=good.id,
                                  extra_body={"tunesmith": {"overrides": ["train.nope=1"]}})
    assert "train.nope" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        c.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=good.id,
                                  extra_body={"tunesmith": {"overrides": ["output.dir=/tmp"]}})
    assert "set by the studio" in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="ft:nothing::0", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        c.fine_tuning.jobs.retrieve("ftjob-nope")

    # a preference file for a supervised job: accepted, then failed in validation with the reason
    pairs = upload(c, write_jsonl(tmp_path / "pairs.jsonl", dpo_rows(10)))
    job = c.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=pairs.id)
    job, _ = wait(c, job.id, lambda j: j.status in ("failed", "succeeded"), timeout=30)
    assert job.status == "failed" and job.error.code == "invalid_training_file" and "use method dpo" in job.error.message

    # a client's file name is never a path: shown as its last part, stored under the file's id
    odd = tmp_path / "odd.jsonl"
    write_jsonl(odd, chat_rows(4))
    with open(odd, "rb") as fh:
        r = studio.http.post("/v1/files", files={"file": ("../../escape.jsonl", fh)}, data={"purpose": "fine-tune"})
    assert r.status_code == 200 and r.json()["filename"] == "escape.jsonl"
    home = studio.app.state.runner.home
    assert not (home.parent / "escape.jsonl").exists() and (home / "files" / f"{r.json()['id']}.jsonl").exists()
    r = studio.http.post("/v1/files", files={"file": ("x.exe", b"MZ")}, data={"purpose": "fine-tune"})
    assert r.status_code == 400 and "unsupported file type" in r.json()["error"]["message"]

    assert c.files.delete(good.id).deleted and good.id not in [x.id for x in c.files.list()]


def test_pause_resume_cancel_and_a_restart_continue_from_checkpoints(tmp_path, tiny_model_dir):
    """A long job: paused mid-run (a checkpoint), resumed (its steps go on past the checkpoint, not from 1), the
    studio stopped and started again on the same home (the job continues by itself), then cancelled mid-run."""
    home = tmp_path / "home"
    s = Running(home, models_dirs=(tiny_model_dir.parent,))
    c = s.client()
    f = upload(c, write_jsonl(tmp_path / "train.jsonl", chat_rows(24)))
    job = c.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=f.id,
                                    extra_body={"tunesmith": {"overrides": FAST + ["train.max_steps=3000",
                                                                                  "train.save_every_steps=5"]}})
    wait(c, job.id, lambda j: len(steps_of(c, j.id)) >= 3)
    c.fine_tuning.jobs.pause(job.id)
    paused, _ = wait(c, job.id, lambda j: j.status == "paused", timeout=120)
    at = max(x.step_number for x in c.fine_tuning.jobs.checkpoints.list(job.id).data)
    messages = [e.message for e in c.fine_tuning.jobs.list_events(job.id, limit=5)]
    assert f"Fine-tuning job paused (checkpoint at step {at})" in messages

    c.fine_tuning.jobs.resume(job.id)
    wait(c, job.id, lambda j: j.status == "running" and max(steps_of(c, j.id)[:1] or [0]) > at + 2)
    newest = steps_of(c, job.id)
    assert at + 1 in newest and newest.count(1) == 1  # continued from the checkpoint, not from the start

    s.stop()  # the job checkpoints and stays `running` in the records
    s = Running(home, models_dirs=(tiny_model_dir.parent,))
    c = s.client()
    assert c.fine_tuning.jobs.retrieve(job.id).status == "running"
    before = max(steps_of(c, job.id))
    wait(c, job.id, lambda j: max(steps_of(c, j.id)[:1] or [0]) > before + 2)
    messages = [e.message for e in c.fine_tuning.jobs.list_events(job.id, limit=1000)]
    assert "The studio restarted; the job continues from its newest checkpoint" in messages

    cancelled = c.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    wait(c, job.id, lambda j: any(e.message.startswith("Fine-tuning job cancelled (checkpoint at step")
                                  for e in c.fine_tuning.jobs.list_events(j.id, limit=5)), timeout=120)
    with pytest.raises(openai.BadRequestError) as e:
        c.fine_tuning.jobs.cancel(job.id)
    assert e.value.code == "invalid_job_status"

    # the live stream replays from Last-Event-ID and ends once the job has ended
    all_events = c.fine_tuning.jobs.list_events(job.id, limit=10_000).data
    with s.http.stream("GET", f"/v1/fine_tuning/jobs/{job.id}/events/stream",
                       headers={"Last-Event-ID": "3"}, timeout=30) as r:
        ids, end = [], None
        for line in r.iter_lines():
            if line.startswith("id: "):
                ids.append(int(line[4:]))
            if line.startswith("event: end"):
                end = True
    assert end and ids == list(range(4, len(all_events) + 1))
    s.stop()


def test_an_api_key_guards_everything_and_other_addresses_need_one(tmp_path, capsys):
    s = Running(tmp_path / "home", api_key="s3cret")
    try:
        r = httpx.get(f"{s.url}/v1/fine_tuning/jobs")
        assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        r = httpx.post(f"{s.url}/v1/files", files={"file": ("a.jsonl", b"{}")}, data={"purpose": "fine-tune"})
        assert r.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        assert s.client("s3cret").fine_tuning.jobs.list().data == []
    finally:
        s.stop()
    assert main(["studio", "--host", "0.0.0.0", "--home", str(tmp_path / "h2")]) == 2
    assert "--api-key" in capsys.readouterr().err


def test_jobs_wait_their_turn_and_a_queued_job_cancels_at_once(tmp_path, tiny_model_dir):
    s = Running(tmp_path / "home", workers=1, models_dirs=(tiny_model_dir.parent,))
    try:
        c = s.client()
        f = upload(c, write_jsonl(tmp_path / "train.jsonl", chat_rows(24)))
        make = lambda steps: c.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=f.id, extra_body={
            "tunesmith": {"overrides": FAST + [f"train.max_steps={steps}"]}})
        long, short = make(3000), make(3)
        wait(c, long.id, lambda j: j.status == "running")
        wait(c, short.id, lambda j: j.status == "queued", timeout=10)  # one worker: the second waits
        assert c.fine_tuning.jobs.cancel(short.id).status == "cancelled"
        c.fine_tuning.jobs.cancel(long.id)
        wait(c, long.id, lambda j: any(e.message.startswith("Fine-tuning job cancelled")
                                       for e in c.fine_tuning.jobs.list_events(j.id, limit=3)), timeout=120)
        assert not s.app.state.runner.run_dir(short.id).path.exists()  # it never ran
        assert c.fine_tuning.jobs.retrieve(short.id).status == "cancelled"
    finally:
        s.stop()


def test_runs_started_from_the_cli_are_listed_and_served(tmp_path, tiny_model_dir):
    from test_train import tiny_cfg
    from tunesmith.train.loop import train

    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"Say {i}.", "output": f"{i} {i}"} for i in range(30)])
    run = train(tiny_cfg(tmp_path, tiny_model_dir, data, "train.max_steps=3", "output.name=from-cli")).run_dir
    s = Running(tmp_path / "home", runs_dirs=(tmp_path / "runs",), models_dirs=(tiny_model_dir.parent,))
    try:
        rows = s.http.get("/v1/studio/runs").json()["data"]
        mine = next(r for r in rows if r["name"] == "from-cli")
        assert (mine["status"], mine["job"], mine["step"], mine["metric"]) == ("succeeded", None, 3, "eval_loss")
        assert mine["value"] < mine["before"]
        metrics = s.http.get("/v1/studio/runs/from-cli/metrics").json()["data"]
        assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]
        c = s.client()
        assert {"from-cli", tiny_model_dir.name} <= {m.id for m in c.models.list()}  # ids, not server paths
        answer = c.chat.completions.create(model="from-cli", messages=[{"role": "user", "content": "Say 2."}],
                                           max_tokens=4, temperature=0)
        assert answer.model == "from-cli"
        assert s.http.get("/v1/studio/runs/from-cli/files/report.html").text.startswith("<!doctype html>")
        assert s.http.get("/v1/studio/runs/from-cli/files/train.log").status_code == 404  # only what is listed
        assert s.http.get("/v1/studio/runs/nope").status_code == 404
        assert run.exists()
    finally:
        s.stop()
