"""The studio is safe to leave running (issue 50; the reproductions of ../shared/design/studio-audit.md as tests, on
a tiny model): a key from every client, checked before the body is read; no cross-origin state change; nothing a
request names reaches a server path or runs code unless the operator allowed it; bounded upload checks; a scheduler
nothing can wedge; one studio per home; no replayed history; no leaks."""
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from conftest import write_jsonl
from test_studio import FAST, Running, chat_rows, steps_of, upload, wait
from tunesmith.errors import TunesmithError
from tunesmith.studio.app import Studio, build_studio
from tunesmith.studio.jobs import Runner
from tunesmith.studio.store import Store


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data-root")
    write_jsonl(root / "operator.jsonl", chat_rows(12))
    return root


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_model_dir, data_root):
    s = Running(tmp_path_factory.mktemp("studio-sec"), models_dirs=(tiny_model_dir.parent,), data_roots=(data_root,))
    yield s
    s.stop()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- H1: who may call it

def test_a_token_is_made_at_start_kept_mode_600_reused_and_required_on_loopback(tmp_path):
    s = Running(tmp_path / "home")
    try:
        token = (tmp_path / "home" / ".token").read_text().strip()
        assert re.fullmatch(r"tml-[A-Za-z0-9_-]{40,}", token) and token == s.key
        assert stat.S_IMODE((tmp_path / "home" / ".token").stat().st_mode) == 0o600
        r = httpx.get(f"{s.url}/v1/models")  # loopback, no key
        assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert httpx.get(f"{s.url}/v1/studio/runs").status_code == 401
        assert httpx.get(f"{s.url}/v1/models", headers={"X-API-Key": token}).status_code == 200
        assert httpx.get(f"{s.url}/v1/models", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert httpx.get(f"{s.url}/v1/models", headers={"X-API-Key": token + "x"}).status_code == 401
        assert httpx.get(f"{s.url}/anything/a/later/router/adds").status_code == 401  # auth by default, any path
        assert httpx.get(f"{s.url}/health").status_code == 200 and httpx.get(f"{s.url}/").status_code == 200
        # the page's link: ?token= becomes an HttpOnly SameSite cookie and leaves the address
        r = httpx.get(f"{s.url}/?token={token}")
        assert r.status_code == 303 and r.headers["location"] == "/"
        cookie = r.headers["set-cookie"]
        assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
        jar = {cookie.split("=", 1)[0]: token}
        assert httpx.get(f"{s.url}/v1/models", cookies=jar).status_code == 200
        assert httpx.get(f"{s.url}/?token=wrong").status_code == 401
    finally:
        s.stop()
    s = Running(tmp_path / "home")  # the next start reuses it
    try:
        assert s.key == token
    finally:
        s.stop()


def test_no_auth_is_an_explicit_loopback_only_opt_out(tmp_path, capsys):
    s = Running(tmp_path / "home", no_auth=True)
    try:
        assert httpx.get(f"{s.url}/v1/models").status_code == 200
        assert not (tmp_path / "home" / ".token").exists()
    finally:
        s.stop()
    from tunesmith.cli.main import main

    assert main(["studio", "--host", "0.0.0.0", "--api-key", "k", "--no-auth", "--home", str(tmp_path / "h2")]) == 2
    assert "--no-auth is for a loopback address only" in capsys.readouterr().err


def test_tunesmith_studio_prints_the_url_with_its_token_and_the_openai_sdk_works_with_it(tmp_path, tiny_model_dir):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith.cli.main", "studio", "--port", str(port), "--home",
                             str(tmp_path / "home"), "--models", str(tiny_model_dir.parent)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONSAFEPATH": "1"})
    try:
        lines = []
        while len(lines) < 30 and not any("api_key=" in ln for ln in lines):
            lines.append(proc.stdout.readline())
        token = (tmp_path / "home" / ".token").read_text().strip()
        assert any(f"http://127.0.0.1:{port}/?token={token}" in ln for ln in lines), lines
        assert any(f"api_key={token}" in ln for ln in lines), lines
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health")
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=token, max_retries=0)
        assert tiny_model_dir.name in [m.id for m in c.models.list()]
        answer = c.completions.create(model=tiny_model_dir.name, prompt="Say", max_tokens=3, temperature=0)
        assert answer.choices[0].text is not None
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="tml-wrong", max_retries=0).models.list()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


# ---------------------------------------------------------------- H1: what a request may reach

def test_overrides_and_models_are_held_to_what_the_operator_allowed(studio, tmp_path, tiny_model_dir, data_root):
    c = studio.client()
    f = upload(c, write_jsonl(tmp_path / "chat.jsonl", chat_rows(12)))
    secret = tmp_path / "secret.txt"
    secret.write_text("AWS_SECRET=abc123-root-only\n")
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(tmp_path / 'pwned')!r}, 'w').write('x')\ndef r(prompts, completions, **kw):\n"
                    f"    return [0.0] * len(completions)\n")

    def refused(overrides, model=str(tiny_model_dir)):
        with pytest.raises(openai.BadRequestError) as e:
            c.fine_tuning.jobs.create(model=model, training_file=f.id, extra_body={"tunesmith": {"overrides": overrides}})
        assert str(tmp_path) not in e.value.message and (model != str(tiny_model_dir) or "/etc" not in e.value.message)
        return e.value

    e = refused(["task=rl", f"rl.rewards=[{{kind: function, path: {evil}:r}}]", "train.max_steps=1"])
    assert e.param == "tunesmith.overrides" and "rl.rewards[0]" in e.message and "--allow-code" in e.message
    assert "data.path" in refused([f"data.path={secret}"]).message
    assert "model.name" in refused(["model.name=/etc"]).message
    assert "data" in refused([f"data={{path: {secret}}}"]).message  # a whole section may not be replaced
    assert "distill.teacher" in refused(["distill.teacher=/etc"]).message
    assert "train.deepspeed_config" in refused(["train.deepspeed_config=/etc/passwd"]).message
    assert "data.path" in refused([f"data.path={data_root}/../{secret.name}"]).message
    # `model` is a bundled name, a finished job's model or a model under --models: a path elsewhere is refused with
    # the same words whether it exists or not (no probe)
    a, b = refused([], model="/etc"), refused([], model="/no/such/dir")
    assert a.code == b.code == "model_not_available" and a.message.replace("/etc", "X") == b.message.replace("/no/such/dir", "X")
    assert not (tmp_path / "pwned").exists()

    # /inspect and /plan are held to the same rules (they once returned any file's text)
    r = studio.http.post("/v1/studio/inspect", json={"model": str(tiny_model_dir), "training_file": f.id,
                                                     "overrides": [f"data.path={secret}", "data.val_size=0"]})
    assert r.status_code == 400 and "data.path" in r.json()["error"]["message"] and "AWS_SECRET" not in r.text
    # what the operator listed is allowed: a file under --data-root, a model under --models (by its id too)
    r = studio.http.post("/v1/studio/inspect", json={"model": tiny_model_dir.name, "training_file": f.id,
                                                     "overrides": ["data.path=operator.jsonl", "data.val_size=0"]})
    assert r.status_code == 200 and "records: 12" in r.json()["text"] and str(data_root) not in r.json()["text"]
    job = c.fine_tuning.jobs.create(model=tiny_model_dir.name, training_file=f.id,
                                    extra_body={"tunesmith": {"overrides": ["train.max_steps=1", "eval.samples=0"]}})
    assert job.status == "validating_files"
    c.fine_tuning.jobs.cancel(job.id)
    ids = [m.id for m in c.models.list()]
    assert tiny_model_dir.name in ids and not any(i.startswith("/") for i in ids)  # ids, never server paths


# ---------------------------------------------------------------- M1, M2: before the body; same origin

def raw_request(port, head: bytes, body: bytes = b"", wait_s=10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        sock.sendall(head + body)
        out = b""
        try:
            while b"\r\n\r\n" not in out:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                out += chunk
        except socket.timeout:
            pass
        return out


def test_the_key_is_checked_before_the_body_is_read(studio):
    # a chunked upload with no key: the 401 comes back while the body has not even started
    head = (f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1:{studio.port}\r\nTransfer-Encoding: chunked\r\n"
            f"Content-Type: multipart/form-data; boundary=x\r\n\r\n").encode()
    started = time.time()
    answer = raw_request(studio.port, head)
    assert answer.startswith(b"HTTP/1.1 401") and time.time() - started < 5
    # a declared size past the limit: 413 before the body is sent
    head = (f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1:{studio.port}\r\nAuthorization: Bearer {studio.key}\r\n"
            f"Content-Length: {600 << 20}\r\nContent-Type: multipart/form-data; boundary=x\r\n\r\n").encode()
    assert raw_request(studio.port, head).startswith(b"HTTP/1.1 413")
    # a chunked JSON body past the limit is counted as it arrives: 413
    def chunks():
        for _ in range(20):
            yield b" " * 65536
    r = studio.http.post("/v1/studio/plan", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_a_page_on_another_origin_cannot_change_state(studio, tmp_path):
    c = studio.client()
    f = upload(c, write_jsonl(tmp_path / "chat.jsonl", chat_rows(4)))
    evil = {"Origin": "https://evil.example"}
    r = studio.http.post("/v1/files", files={"file": ("a.jsonl", b'{"text": "a"}\n')}, data={"purpose": "fine-tune"},
                         headers=evil)
    assert r.status_code == 403 and r.json()["error"]["code"] == "cross_origin_refused"
    assert studio.http.post("/v1/fine_tuning/jobs/ftjob-x/pause", headers=evil).status_code == 403
    assert studio.http.post("/v1/fine_tuning/jobs/ftjob-x/pause", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert studio.http.delete(f"/v1/files/{f.id}", headers={"Origin": "null"}).status_code == 403
    # the studio's own page passes
    own = {"Origin": f"http://127.0.0.1:{studio.port}", "Sec-Fetch-Site": "same-origin"}
    assert studio.http.post("/v1/fine_tuning/jobs/ftjob-x/pause", headers=own).status_code == 404
    # the cookie works only from the studio's own pages, GET included
    jar = {f"tunesmith-token-{studio.port}": studio.key}
    assert httpx.get(f"{studio.url}/v1/files", cookies=jar, headers={"Sec-Fetch-Site": "same-site"}).status_code == 403
    assert httpx.get(f"{studio.url}/v1/files", cookies=jar, headers={"Sec-Fetch-Site": "same-origin"}).status_code == 200


# ---------------------------------------------------------------- H2: bounded upload checks

def rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_growth(action):
    """(action's result, the most this process's resident memory grew while it ran)."""
    base, peak, done = rss(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss() - base)
            time.sleep(0.005)
    t = threading.Thread(target=watch)
    t.start()
    try:
        return action(), peak[0]
    finally:
        done.set()
        t.join()


def test_a_parquet_bomb_and_a_100_mib_line_are_refused_with_bounded_memory(studio, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # the audit's 621-byte file: 50,000 rows of one 1 MiB string, dictionary + zstd: 48.8 GiB decoded
    value = "a" * (1 << 20)
    indices = pa.array([0] * 50_000, type=pa.int32())
    column = pa.DictionaryArray.from_arrays(indices, pa.array([value]))
    bomb = tmp_path / "bomb.parquet"
    pq.write_table(pa.table({"text": column}), bomb, compression="zstd", use_dictionary=True)
    assert bomb.stat().st_size < 4096
    def post(path):  # streamed from the file, so that only the studio's memory is measured
        with open(path, "rb") as fh:
            r = studio.http.post("/v1/files", files={"file": (path.name, fh)}, data={"purpose": "fine-tune"}, timeout=600)
        assert r.status_code == 200, r.text
        return r.json()

    f, grew = peak_growth(lambda: post(bomb))
    assert f["status"] == "error" and "bomb.parquet" in f["status_details"] and str(tmp_path) not in f["status_details"]
    assert grew < 200 << 20, grew

    line = tmp_path / "line.jsonl"
    with open(line, "w") as fh:
        fh.write('{"text": "' + "a" * (100 << 20) + '"}\n')
    f, grew = peak_growth(lambda: post(line))
    assert f["status"] == "error" and "line.jsonl:1: a line longer than" in f["status_details"]
    assert grew < 200 << 20, grew
    c = studio.client()
    assert c.files.retrieve(f["id"]).status == "error"
    ok = upload(c, write_jsonl(tmp_path / "ok.jsonl", chat_rows(5)))  # an ordinary file still passes
    assert ok.status == "processed" and ok.to_dict()["tunesmith"]["records"] == 5


# ---------------------------------------------------------------- H3, M6: the scheduler; history kept once

def fake_job(store, home, job_id, log_text):
    from tunesmith.run import RunDir

    run = RunDir(home / "runs" / job_id)
    run.path.mkdir(parents=True)
    run.log.write_text(log_text)
    run.metrics.write_text(json.dumps({"step": 1, "total_steps": 2, "loss": 1.5}) + "\n{torn\n")
    store.add_job(job_id, {"model": "m", "training_file": "f", "_plan": {"task": "causal"}}, str(run.path), "running")
    return run


def test_a_log_line_that_is_only_a_number_does_not_wedge_the_scheduler(tmp_path):
    from tunesmith.studio.jobs import Running as Proc

    store = Store(tmp_path / "studio.db")
    runner = Runner(store, tmp_path, results=lambda job: {})
    fake_job(store, tmp_path, "ftjob-a", "rl: len\n7\nx x 1 | grpo\n")
    runner.running["ftjob-a"] = Proc("ftjob-a", subprocess.Popen(["true"]))
    runner.running["ftjob-a"].proc.wait()
    runner.tick()  # once raised IndexError here, on every tick, for good
    messages = [e["message"] for e in store.events("ftjob-a", limit=100, newest_first=False)]
    assert messages[:3] == ["rl: len", "7", "x x 1 | grpo"] and "ftjob-a" not in runner.running
    assert store.job("ftjob-a")["status"] == "failed"  # exited 0 without a final model

    # a job whose step keeps raising is failed on its own; the others go on and shutdown completes
    fake_job(store, tmp_path, "ftjob-b", "ok\n")
    runner.running["ftjob-b"] = Proc("ftjob-b", subprocess.Popen(["sleep", "30"]))
    runner.results = lambda job: 1 / 0
    runner._read_files = lambda job_id: 1 / 0
    for _ in range(6):
        runner.tick()
    assert store.job("ftjob-b")["status"] == "failed" and json.loads(store.job("ftjob-b")["error"])["code"] == "studio_error"
    runner.shutdown(wait=5)


def test_a_restarted_studio_does_not_replay_events(tmp_path):
    store = Store(tmp_path / "studio.db")
    fake_job(store, tmp_path, "ftjob-a", "data: x\nplan: y\n")
    Runner(store, tmp_path)._read_files("ftjob-a")
    before = store.events("ftjob-a", limit=100)
    Runner(store, tmp_path)._read_files("ftjob-a")  # a new studio process on the same home
    assert len(store.events("ftjob-a", limit=100)) == len(before) == 3  # two log lines and one step


# ---------------------------------------------------------------- M3, M5, L2: one per home; shutdown; safe path

def test_a_second_studio_on_the_same_home_is_refused_naming_the_first(tmp_path):
    s = Running(tmp_path / "home")
    try:
        with pytest.raises(TunesmithError, match=rf"pid {os.getpid()}, port {s.port}"):
            build_studio(Studio(tmp_path / "home"), port=1)
    finally:
        s.stop()
    Running(tmp_path / "home").stop()  # free again once the first has stopped


def test_shutdown_completes_with_an_event_stream_open_and_jobs_do_not_import_from_home(tmp_path, tiny_model_dir):
    home = tmp_path / "home"
    home.mkdir()
    (home / "difflib.py").write_text(f"open({str(tmp_path / 'shadowed')!r}, 'w').write('imported')\n")
    s = Running(home, models_dirs=(tiny_model_dir.parent,))
    c = s.client()
    f = upload(c, write_jsonl(tmp_path / "train.jsonl", chat_rows(24)))
    job = c.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=f.id, extra_body={
        "tunesmith": {"overrides": FAST + ["train.max_steps=3000", "train.save_every_steps=5"]}})
    wait(c, job.id, lambda j: len(steps_of(c, j.id)) >= 2)
    lines = s.http.get(f"/v1/studio/runs/{job.id}/log").json()["lines"]  # L1: the run's log with no server path
    assert any(f"runs/{job.id}" in ln for ln in lines) and not any(str(home) in ln for ln in lines)
    opened = threading.Event()

    def listen():
        try:
            with s.http.stream("GET", f"/v1/fine_tuning/jobs/{job.id}/events/stream", timeout=120) as r:
                for _ in r.iter_lines():
                    opened.set()
        except httpx.HTTPError:
            pass
    t = threading.Thread(target=listen, daemon=True)
    t.start()
    assert opened.wait(30)
    started = time.time()
    s.stop()
    assert not s.thread.is_alive() and time.time() - started < 30  # once: never, while the stream was open
    assert not (tmp_path / "shadowed").exists()  # PYTHONSAFEPATH: HOME's difflib.py was not imported
    store = Store(home / "studio.db")
    messages = [e["message"] for e in store.events(job.id, limit=5)]
    assert "The studio stopped; the job continues when it starts again" in messages


# ---------------------------------------------------------------- M7: the model pool keeps its limit

def test_the_model_pool_never_holds_more_than_its_limit(tmp_path, tiny_model_dir):
    import asyncio
    import shutil

    from starlette.exceptions import HTTPException

    from tunesmith.models.engine import Request, Sampling
    from tunesmith.studio import pool as pool_module
    from tunesmith.studio.pool import ModelPool

    models = tmp_path / "models"
    for name in ("a", "b"):
        shutil.copytree(tiny_model_dir, models / name)
    p = ModelPool(Store(tmp_path / "studio.db"), Studio(tmp_path), max_loaded=1)
    p.models_dirs = (models,)
    try:
        a = asyncio.run(p.target("a"))
        busy = a.engine.submit(Request([5, 6, 7], Sampling(max_new_tokens=200, do_sample=True), [], a.model.adapter))
        with pytest.raises(HTTPException) as e:  # once: loaded past the limit, and kept
            asyncio.run(p.target("b"))
        assert e.value.status_code == 429 and list(p.loaded) == ["a"]
        busy.cancel()
        busy.wait()
        time.sleep(pool_module.IDLE_SECONDS + 0.1)
        assert asyncio.run(p.target("b")) is not None and list(p.loaded) == ["b"]
    finally:
        p.stop()


# ---------------------------------------------------------------- M8: work that grows with the runs is off the loop

def test_health_answers_while_200_runs_are_listed(tmp_path, tiny_model_dir):
    import shutil

    from test_train import tiny_cfg
    from tunesmith.train.loop import train

    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"Say {i}.", "output": f"{i} {i}"} for i in range(30)])
    run = train(tiny_cfg(tmp_path, tiny_model_dir, data, "train.max_steps=2", "eval.samples=0",
                         "output.name=r000")).run_dir
    for i in range(1, 200):
        shutil.copytree(run, run.parent / f"r{i:03d}")
    s = Running(tmp_path / "home", runs_dirs=(run.parent,), models_dirs=(tiny_model_dir.parent,))
    try:
        listed, worst = {}, [0.0]

        def list_runs():
            listed["runs"] = s.http.get("/v1/studio/runs", timeout=300).json()["data"]
            listed["models"] = s.http.get("/v1/models", timeout=300).json()["data"]
        t = threading.Thread(target=list_runs)
        t.start()
        with httpx.Client(base_url=s.url) as h:
            while t.is_alive():
                started = time.perf_counter()
                assert h.get("/health").status_code == 200
                worst[0] = max(worst[0], time.perf_counter() - started)
                time.sleep(0.02)
        t.join()
        assert len(listed["runs"]) == 200 and len(listed["models"]) >= 200
        print(f"/health worst {worst[0] * 1000:.0f} ms while 200 runs and their models were listed")
        assert worst[0] < 0.5, worst  # once: 6.4 s (the audit's M8), the listing on the event loop
    finally:
        s.stop()


# ---------------------------------------------------------------- M4: resumable while its checkpoints exist

def test_a_job_that_may_resume_keeps_its_file_and_a_failed_one_with_a_checkpoint_resumes(studio, tmp_path):
    c = studio.client()
    f = upload(c, write_jsonl(tmp_path / "chat.jsonl", chat_rows(4)))
    store, runner = studio.app.state.store, studio.app.state.runner
    plan = {"source": "studio", "overrides": [], "hyperparameters": {"n_epochs": 1}, "base": "tiny", "task": "causal",
            "recipe": "studio"}
    request = {"model": "tiny", "training_file": f.id, "_plan": plan, "_model_source": "x", "_model_id": "tiny"}
    store.add_job("ftjob-paused0", request, str(runner.run_dir("ftjob-paused0").path), "paused")
    with pytest.raises(openai.ConflictError):  # once: deleted, and the paused job could never continue
        c.files.delete(f.id)
    store.update_job("ftjob-paused0", status="failed")  # e.g. a full disk stopped it ...
    ckpt = runner.run_dir("ftjob-paused0").checkpoints / "step-0000005"
    ckpt.mkdir(parents=True)                           # ... after its checkpoint at step 5
    with pytest.raises(openai.ConflictError):
        c.files.delete(f.id)
    job = c.fine_tuning.jobs.resume("ftjob-paused0")   # once: 400, "a paused or cancelled job can be resumed"
    assert job.status == "validating_files"
    try:  # its made-up plan would fail at start anyway
        c.fine_tuning.jobs.cancel("ftjob-paused0")
    except openai.BadRequestError:
        pass
