"""Load test for `tunesmith serve` (issue 31's bar): streaming clients, plain clients and clients that hang up
mid-stream at the same moment, then one more request; and the tokens/s of 32 concurrent streams against one stream.

    .venv/bin/python bench/serve_load.py [--model smollm2-135m-instruct] [--streams 64 --plain 16 --hang-ups 8]

Starts the server in-process on a free loopback port (SmolLM2-135M-Instruct by default) and drives it with httpx
(SSE read line by line) and the official openai client. Prints one markdown table per part. Must hold: 0 errors,
every kept stream ends with [DONE], the request after the load is answered at once, 32 streams >= 4x one stream.
"""
from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import uvicorn

from tunesmith.export.serve import build_app, load_served


def start(model: str, rows: int):
    served = load_served([model], merge=True, max_rows=rows, max_waiting=512)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(served), host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return served, server, f"http://127.0.0.1:{port}"


def stream(url: str, name: str, i: int, max_tokens: int, hang_up_after: int | None = None) -> dict:
    body = {"model": name, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": f"Tell me about the number {i} in a few sentences."}]}
    t0, first, tokens, done, error = time.perf_counter(), None, 0, False, None
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=900) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}", "seconds": time.perf_counter() - t0}
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    error = event["error"]["message"]
                    continue
                if event["choices"][0]["delta"].get("content"):
                    first = first or time.perf_counter() - t0
                    tokens += 1
                    if hang_up_after is not None and tokens >= hang_up_after:
                        return {"hung_up": True, "seconds": time.perf_counter() - t0}
    except Exception as e:  # counted, not raised: the point is to see them
        error = repr(e)
    return {"seconds": time.perf_counter() - t0, "first": first, "chunks": tokens, "done": done, "error": error}


def plain(url: str, name: str, i: int, max_tokens: int) -> dict:
    body = {"model": name, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": f"Give me one fact about the number {i}."}]}
    t0 = time.perf_counter()
    try:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=900)
        ok = r.status_code == 200
        return {"seconds": time.perf_counter() - t0, "tokens": r.json()["usage"]["completion_tokens"] if ok else 0,
                "error": None if ok else f"HTTP {r.status_code}: {r.text[:200]}"}
    except Exception as e:
        return {"seconds": time.perf_counter() - t0, "tokens": 0, "error": repr(e)}


def load(url: str, name: str, streams: int, plains: int, hang_ups: int, max_tokens: int) -> None:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(streams + plains + hang_ups) as pool:
        s = [pool.submit(stream, url, name, i, max_tokens) for i in range(streams)]
        p = [pool.submit(plain, url, name, 1000 + i, max_tokens) for i in range(plains)]
        h = [pool.submit(stream, url, name, 2000 + i, 512, hang_up_after=3) for i in range(hang_ups)]
        s, p, h = [f.result() for f in s], [f.result() for f in p], [f.result() for f in h]
    wall = time.perf_counter() - t0
    errors = [r["error"] for r in s + p if r.get("error")]
    ended = sum(r.get("done", False) for r in s)
    after = plain(url, name, 9999, 16)
    first = sorted(r["first"] for r in s if r.get("first"))
    print("| streams | plain | hang-ups | errors | streams ending [DONE] | median first token s | wall s | "
          "request after the load s |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {streams} | {plains} | {hang_ups} | {len(errors)} | {ended}/{streams} | "
          f"{first[len(first) // 2] if first else float('nan'):.2f} | {wall:.1f} | {after['seconds']:.2f} |")
    for e in errors[:5]:
        print("error:", e)


def throughput(url: str, name: str, served, concurrent: int, max_tokens: int) -> float:
    """Generated tokens/s of the engine while `concurrent` greedy streams of `max_tokens` run."""
    before, t0 = served.engine.generated_tokens, time.perf_counter()
    with ThreadPoolExecutor(concurrent) as pool:
        list(pool.map(lambda i: stream(url, name, 5000 + i, max_tokens), range(concurrent)))
    return (served.engine.generated_tokens - before) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--plain", type=int, default=16)
    ap.add_argument("--hang-ups", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rows", type=int, default=64)
    args = ap.parse_args()
    served, server, url = start(args.model, args.rows)
    name = served.names[0]
    print(f"model {args.model}, engine rows {args.rows}, max_tokens {args.max_tokens}\n")
    load(url, name, args.streams, args.plain, args.hang_ups, args.max_tokens)
    one = throughput(url, name, served, 1, 64)
    many = throughput(url, name, served, 32, 64)
    print("\n| concurrent streams | generated tok/s | x one stream |\n|---|---|---|")
    print(f"| 1 | {one:.1f} | 1.00 |\n| 32 | {many:.1f} | {many / one:.2f} |")
    server.should_exit = True


if __name__ == "__main__":
    main()
