"""Load test for `tunesmith serve`: N concurrent clients (official openai client), loopback only.

    .venv/bin/python bench/serve_load.py [--model smollm2-135m-instruct] [--clients 50] [--max-tokens 16]

Starts the server in-process on a free localhost port, fires one chat request per client at
once, and prints errors and latency percentiles (queueing included: requests run one at a time).
"""
from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import uvicorn

from tunesmith.export.serve import build_app, load_served


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    served = load_served([args.model], merge=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(served), host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)

    def one(i: int):
        t0 = time.perf_counter()
        try:
            r = client.chat.completions.create(model=args.model, max_tokens=args.max_tokens, temperature=0,
                                               messages=[{"role": "user", "content": f"Give me one fact about the number {i}."}])
            return time.perf_counter() - t0, r.usage.completion_tokens, None
        except Exception as e:  # counted, not raised: the point is to see them
            return time.perf_counter() - t0, 0, repr(e)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        results = list(pool.map(one, range(args.clients)))
    wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in results)
    errors = [r[2] for r in results if r[2]]
    pct = lambda p: lat[min(len(lat) - 1, int(p / 100 * len(lat)))]  # noqa: E731
    print("| clients | max_tokens | errors | p50 s | p90 s | p99 s | max s | mean s | wall s | generated tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.clients} | {args.max_tokens} | {len(errors)} | {pct(50):.2f} | {pct(90):.2f} | {pct(99):.2f} | {lat[-1]:.2f} | "
          f"{statistics.mean(lat):.2f} | {wall:.1f} | {sum(r[1] for r in results) / wall:.1f} |")
    for e in errors[:5]:
        print("error:", e)
    server.should_exit = True


if __name__ == "__main__":
    main()
