"""The OpenAI-compatible server, driven by the official `openai` client on localhost, and the chat loop."""
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn

from tunesmith.models.engine import Request, Sampling as EngineSampling
from tunesmith.models.generate import Sampling
from tunesmith.export.chat import chat_loop
from tunesmith.export.serve import build_app, load_served
from tunesmith.train.loop import train
from test_train import tiny_cfg


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir_for_serve):
    tmp = tmp_path_factory.mktemp("serve")
    from conftest import write_jsonl
    data = write_jsonl(tmp / "d.jsonl", [{"instruction": f"Say {i}.", "output": f"{i} {i}"} for i in range(30)])
    runs = [train(tiny_cfg(tmp, tiny_model_dir_for_serve, data, "train.max_steps=3", f"output.name={n}", f"train.seed={k}")).run_dir
            for k, n in enumerate(["alpha", "beta"])]
    served = load_served([str(r) for r in runs], merge=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(build_app(served), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", served
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def tiny_model_dir_for_serve(tiny_model_dir):
    return tiny_model_dir


def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_models_health_and_chat(server):
    url, _ = server
    c = client(url)
    assert [m.id for m in c.models.list()] == ["alpha", "beta"]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    r = c.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "Say 3."}], max_tokens=6, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and isinstance(r.choices[0].message.content, str)
    assert r.usage.completion_tokens <= 6 and r.usage.prompt_tokens > 0
    # streaming gives the same greedy text
    pieces = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "Say 3."}], max_tokens=6, temperature=0, stream=True)]
    assert "".join(pieces) == r.choices[0].message.content
    # each adapter is its own model
    b = c.chat.completions.create(model="beta", messages=[{"role": "user", "content": "Say 3."}], max_tokens=6, temperature=0)
    assert b.model == "beta"


def test_completions_endpoint(server):
    url, _ = server
    r = client(url).completions.create(model="beta", prompt=["Hello", "World"], max_tokens=4, temperature=0)
    assert [ch.index for ch in r.choices] == [0, 1] and r.object == "text_completion"


def test_bad_requests_get_openai_shaped_4xx_errors(server):
    url, served = server
    c = client(url)
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert "available: alpha, beta" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "x"}], temperature=5)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "word " * (served.context + 10)}])
    assert e.value.body["code"] == "context_length_exceeded"
    for body in (b"{not json", b'{"model": "alpha"}', b'{"model": "alpha", "messages": [{"role": "robot", "content": "x"}]}'):
        r = httpx.post(f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{url}/v1/chat/completions", content=b"x" * (2 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert httpx.get(f"{url}/health").status_code == 200  # still alive


def test_concurrent_clients_all_succeed(server):
    url, _ = server
    c = client(url)

    def ask(i):
        return c.chat.completions.create(model=["alpha", "beta"][i % 2], messages=[{"role": "user", "content": f"Say {i}."}],
                                         max_tokens=4, temperature=0).choices[0].finish_reason

    with ThreadPoolExecutor(12) as pool:
        assert all(f in ("stop", "length") for f in pool.map(ask, range(24)))


def test_batched_answers_equal_one_by_one_answers(server):
    url, served = server
    c = client(url)
    prompts = [f"Say {i}." + " please" * (i % 3) for i in range(6)]

    def text(p):
        return c.chat.completions.create(model="alpha", messages=[{"role": "user", "content": p}], max_tokens=5,
                                         temperature=0).choices[0].message.content

    alone = [text(p) for p in prompts]
    with ThreadPoolExecutor(6) as pool:  # they meet in the engine's running batch
        together = list(pool.map(text, prompts))
    assert together == alone


def _sse(url, body, headers=None, timeout=60):
    """The data lines of an SSE response (with the [DONE] marker), and the error events."""
    lines = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                lines.append(line[6:])
    return lines


def test_streams_plain_requests_and_hang_ups_together_then_a_request_is_answered_at_once(server):
    """A small version of bench/serve_load.py: 12 streams, 4 plain requests and 4 clients that hang up mid-stream."""
    import json as _json
    url, served = server
    body = lambda i, n=12: {"model": ["alpha", "beta"][i % 2], "messages": [{"role": "user", "content": f"Say {i}."}],  # noqa: E731
                            "max_tokens": n, "temperature": 0, "stream": True}

    def stream(i):
        lines = _sse(url, body(i))
        assert lines[-1] == "[DONE]" and not any('"error"' in x for x in lines)
        return "".join((_json.loads(x)["choices"][0]["delta"].get("content") or "") for x in lines[:-1])

    def plain(i):
        return client(url).chat.completions.create(model="alpha", messages=[{"role": "user", "content": f"Say {i}."}],
                                                   max_tokens=8, temperature=0).choices[0].finish_reason

    def hang_up(i):
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body(i, 200), timeout=60) as r:
            for n, _ in enumerate(r.iter_lines()):
                if n >= 2:
                    return "gone"  # closing the connection mid-stream

    with ThreadPoolExecutor(20) as pool:
        futures = ([pool.submit(stream, i) for i in range(12)] + [pool.submit(plain, i) for i in range(4)]
                   + [pool.submit(hang_up, i) for i in range(4)])
        results = [f.result(timeout=120) for f in futures]
    assert all(isinstance(r, str) for r in results[:12]) and all(r in ("stop", "length") for r in results[12:16])
    t0 = time.time()
    assert plain(99) in ("stop", "length") and time.time() - t0 < 10
    deadline = time.time() + 10
    while served.engine.pending() and time.time() < deadline:  # the hung-up generations were cancelled
        time.sleep(0.1)
    assert served.engine.pending() == 0


def test_a_failed_generation_ends_its_own_stream_and_nobody_elses(server, monkeypatch):
    url, served = server
    engine = served.engine
    real = engine._forward

    def broken(ids, *a, **kw):
        if ids.shape[1] > 1 and 77 in ids[0].tolist():
            raise RuntimeError("out of memory at /secret/path")
        return real(ids, *a, **kw)

    poison = served.tokenizer.decode([77])
    monkeypatch.setattr(engine, "_forward", broken)
    lines = _sse(url, {"model": "alpha", "messages": [{"role": "user", "content": poison}], "max_tokens": 4, "stream": True})
    assert lines[-1] == "[DONE]" and any('"error"' in x and "RuntimeError" in x for x in lines)
    assert not any("/secret/path" in x for x in lines)
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "alpha", "messages": [{"role": "user", "content": poison}],
                                                       "max_tokens": 4})
    assert r.status_code == 500 and "/secret" not in r.text
    monkeypatch.undo()
    assert client(url).chat.completions.create(model="beta", messages=[{"role": "user", "content": "Say 1."}],
                                               max_tokens=4).choices[0].finish_reason in ("stop", "length")


def test_limits_keys_hosts_and_health(server):
    url, served = server
    big = b'{"model": "alpha", "messages": [{"role": "user", "content": "' + b"x" * (2 << 20) + b'"}]}'
    r = httpx.post(f"{url}/v1/chat/completions", content=iter([big[i:i + 65536] for i in range(0, len(big), 65536)]),
                   headers={"content-type": "application/json"})  # chunked: no Content-Length
    assert r.status_code == 413
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "alpha", "messages": [{"role": "user", "content": "x"}],
                                                       "temperature": 1e-40, "max_tokens": 3})
    assert r.status_code == 200  # greedy, not NaN
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "alpha", "messages": [{"role": "user", "content": "x"}],
                                                       "frobnicate": 1})
    assert r.status_code == 400 and "frobnicate" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "alpha", "stop": ["a", "b", "c", "d", "e"], "max_tokens": 3,
                                                       "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    assert httpx.get(f"{url}/nope").json()["error"]["type"] == "invalid_request_error"  # OpenAI's shape for a 404 too
    assert httpx.get(f"{url}/health", headers={"host": "evil.example"}).status_code == 400  # DNS rebinding
    served.api_key = "s3cret"
    try:
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"authorization": "Bearer s3cret"}).status_code == 200
        assert "models" not in httpx.get(f"{url}/health").json()  # reveals nothing without the key
    finally:
        served.api_key = None
    engine = served.engine
    engine.stop()
    try:
        assert httpx.get(f"{url}/health").status_code == 503
        engine.max_waiting, old = 2, engine.max_waiting
        for _ in range(2):  # the queue is full while the worker is stopped
            engine.submit(Request([5, 6], EngineSampling(max_new_tokens=1)))
        r = httpx.post(f"{url}/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 2}, timeout=10)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        engine.max_waiting = old
    finally:
        engine._stopping = False
        engine.start()
    assert httpx.get(f"{url}/health").status_code == 200


def test_chat_loop(tiny_model_dir):
    from tunesmith.methods.load import load_model
    from tunesmith.models import load_tokenizer
    import torch
    model = load_model(tiny_model_dir, torch.float32, torch.device("cpu"))
    lines = iter(["hello", "/system be brief", "again", "/reset", "/quit"])
    out = []
    chat_loop(model, load_tokenizer(tiny_model_dir), Sampling(max_new_tokens=4), read=lambda _: next(lines), write=out.append)
    text = "".join(out)
    assert text.count("bot> ") == 2 and "system message set" in text and "conversation cleared" in text


def _chat(url, **body):
    return httpx.post(f"{url}/v1/chat/completions", timeout=60,
                      json={"model": "alpha", "messages": [{"role": "user", "content": "Say 1."}], **body})


def test_an_out_of_range_seed_is_a_400_and_a_failed_submit_leaves_nothing_generating(server, monkeypatch):
    """Audit M9: `seed: 2**64` was a 500, and the completions submitted before the failure went on for nobody."""
    url, served = server
    for seed in (2**64 - 7, 2**63, -2**63 - 1):
        r = _chat(url, seed=seed, n=8, max_tokens=4)
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed", r.text
    r = _chat(url, seed=2**63 - 1, n=3, max_tokens=2)  # seed + k wraps within torch's int64
    assert r.status_code == 200 and len(r.json()["choices"]) == 3
    engine, real, seen = served.engine, served.engine.submit, []

    def failing(req):
        if len(seen) == 2:
            raise RuntimeError("submit failed")
        seen.append(req)
        return real(req)

    monkeypatch.setattr(engine, "submit", failing)
    r = _chat(url, n=4, max_tokens=200)
    assert r.status_code == 500 and len(seen) == 2
    assert all(q.cancelled for q in seen)  # rolled back, not generating for nobody
    monkeypatch.undo()
    deadline = time.time() + 10
    while engine.pending() and time.time() < deadline:
        time.sleep(0.05)
    assert engine.pending() == 0


def test_health_answers_while_a_1_mib_prompt_is_tokenised(server):
    """Audit M8: rendering and tokenising a prompt ran on the event loop (a 1 MiB one stalled /health for seconds).
    The issue's goal is 100 ms; asserted at 0.5 s because the machine is shared (the worst time is printed). The
    character bound is lifted here so that the prompt is tokenised (next test: by default it is refused untokenised)."""
    url, served = server
    served.max_body_bytes, old = 4 << 20, served.max_body_bytes
    served.chars_per_token, old_chars = 1 << 20, served.chars_per_token
    try:
        with ThreadPoolExecutor(1) as pool:
            big = pool.submit(_chat, url, messages=[{"role": "user", "content": "word " * (1 << 18)}])
            worst, polls = 0.0, 0
            while not big.done():
                t0 = time.perf_counter()
                assert httpx.get(f"{url}/health", timeout=30).status_code == 200
                worst, polls = max(worst, time.perf_counter() - t0), polls + 1
                time.sleep(0.02)
            r = big.result()
    finally:
        served.max_body_bytes, served.chars_per_token = old, old_chars
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    print(f"/health worst {worst * 1000:.0f} ms over {polls} polls while a 1 MiB prompt was tokenised")
    assert polls >= 3 and worst < 0.5


def test_a_prompt_that_cannot_fit_the_context_is_refused_before_it_is_tokenised(server, monkeypatch):
    """Bounded work per request: a prompt longer than the context x chars_per_token characters is refused without
    tokenising it (it was tokenised whole, seconds for 1 MiB, only to be refused), chat and completions alike; a
    prompt under the bound is still tokenised and answered."""
    url, served = server
    calls = []
    tokenizer = served.tokenizer
    served.max_body_bytes, old = 4 << 20, served.max_body_bytes
    limit = served.context * served.chars_per_token
    real_call = type(tokenizer).__call__

    def counting(self, text, *a, **kw):
        calls.append(len(text) if isinstance(text, str) else -1)
        return real_call(self, text, *a, **kw)

    monkeypatch.setattr(type(tokenizer), "__call__", counting)
    try:
        big = "w" * (limit + 1)
        r = _chat(url, messages=[{"role": "user", "content": big}])
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "characters" in r.json()["error"]["message"] and max(calls, default=0) <= limit
        r = httpx.post(f"{url}/v1/completions", json={"model": "alpha", "prompt": big, "max_tokens": 2}, timeout=60)
        assert r.status_code == 400 and max(calls, default=0) <= limit
        r = httpx.post(f"{url}/v1/completions", json={"model": "alpha", "prompt": "hi there", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200 and calls
    finally:
        served.max_body_bytes = old


def test_the_key_is_checked_before_the_body_is_read(server):
    """Audit M1: the body was buffered (up to the limit) before the key was checked. Here a client without the key
    announces 500 kB and sends 100 bytes: the 401 must come at once, without waiting for the rest."""
    url, served = server
    host, port = url.removeprefix("http://").split(":")
    served.api_key = "s3cret"
    try:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 500000\r\n\r\n" + b"x" * 100)
            s.settimeout(3)
            head = s.recv(4096)
        assert head.startswith(b"HTTP/1.1 401"), head
        r = httpx.post(f"{url}/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 2},
                       headers={"authorization": "Bearer s3cret"}, timeout=60)
        assert r.status_code == 200
    finally:
        served.api_key = None


def test_default_max_tokens_is_the_rest_of_the_context(server):
    """Audit L6: a request without max_tokens asked for 256 new tokens and was refused on a small context."""
    url, served = server
    n_prompt = _chat(url, max_tokens=1).json()["usage"]["prompt_tokens"]
    served.context, old = n_prompt + 5, served.context
    try:
        r = _chat(url, temperature=0)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 5, r.text
        served.context = n_prompt
        r = _chat(url, temperature=0)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    finally:
        served.context = old


def test_an_empty_prompt_is_a_400(server):
    """An empty prompt made the engine's submit raise: a 500 (found while fixing M9)."""
    url, _ = server
    r = httpx.post(f"{url}/v1/completions", json={"model": "alpha", "prompt": ["hi", ""], "max_tokens": 2}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
