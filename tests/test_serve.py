"""The OpenAI-compatible server, driven by the official `openai` client on localhost, and the chat loop."""
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn

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
    served.batcher.WINDOW = 0.2  # make sure they meet in one batch
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(text, prompts))
    served.batcher.WINDOW = 0.01
    assert together == alone


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
