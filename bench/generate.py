"""Generation speed: the engine (models/engine.py) against model.generate on the same model, prompts and lengths.

    .venv/bin/python bench/generate.py [--model smollm2-135m-instruct] [--quick]

Three shapes (issue 36), greedy unless said:
  (a) eval: 64 TL;DR abstracts (~250-token prompts, the TL;DR recipe's system prompt), 32 new tokens;
      model.generate as tunesmith ran it before, left-padded batches of 16 sorted by length;
  (b) RL: 8 sampled completions of each of 8 docstring prompts, 64 new tokens; model.generate with
      num_return_sequences=8, 2 prompts (16 rows) per call;
  (c) chat: 16 concurrent short chat requests, 48 new tokens; model.generate one request at a time, and as one
      padded batch of 16.
For each: generated tokens/s, mean time to the first token, and the achieved GFLOP/s of generation (2 x the
parameters a token passes through, per generated token, plus the prefill's tokens) against this machine's fp32 matmul
peak measured in the same run; then batched decoding alone (64 rows, no prefill in the timing). With llama-cpp-python
installed (`pip install llama-cpp-python`: it compiles llama.cpp), llama.cpp on the same weights (an f32 GGUF written
by tunesmith's export) is a reference row of each shape.
Compare ratios within one run: the machines are shared.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from tunesmith.data.sources import data_dir

HERE = Path(__file__).resolve().parent
DATA = data_dir()   # the data folder (TUNESMITH_DATA_DIR; docs/data.md): summarization_scitldr, instruct_mix


def matmul_peak(seconds: float = 2.0) -> float:
    a, b = torch.randn(2048, 576), torch.randn(576, 1536)
    for _ in range(3):
        a @ b
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        a @ b
        n += 1
    return n * 2 * 2048 * 576 * 1536 / (time.perf_counter() - t) / 1e9


def flops_per_token(model) -> float:
    """2 x the weights one token's forward multiplies by (the blocks and the output head)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    blocks = sum(p.numel() for n, p in inner.named_parameters() if ".layers." in n)
    return 2.0 * (blocks + inner.get_output_embeddings().weight.numel())


def hf(model, tok, prompts: list[str], new: int, batch: int, sample: bool = False, copies: int = 1):
    """model.generate on left-padded batches; (outputs, seconds, first-token seconds per request)."""
    from tunesmith.models.engine import eos_ids

    tok.padding_side = "left"
    eos = eos_ids(tok, model)
    outs, firsts, t0 = {}, [], time.perf_counter()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        tb = time.perf_counter()
        kw = dict(max_new_tokens=new, pad_token_id=tok.pad_token_id, eos_token_id=eos, num_return_sequences=copies)
        kw.update(dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else
                  dict(do_sample=False, temperature=None, top_p=None, top_k=None))
        with torch.no_grad():
            out = model.generate(**enc, **kw)[:, enc["input_ids"].shape[1]:]
        # time to first token: a padded batch gives every row its first token after the batch's prefill; measured as
        # the wall time of one generated token for the same batch
        with torch.no_grad():
            tf = time.perf_counter()
            model.generate(**enc, **{**kw, "max_new_tokens": 1})
            firsts += [(tb - t0) + (time.perf_counter() - tf)] * len(idx) * copies
        for n, row in enumerate(out.tolist()):  # rows: each prompt's copies in turn
            outs[(idx[n // copies], n % copies)] = row[:next((j + 1 for j, x in enumerate(row) if x in eos), len(row))]
    tok.padding_side = "right"
    return [outs[key] for key in sorted(outs)], time.perf_counter() - t0, firsts


def engine_run(model, tok, prompts: list[str], new: int, rows: int, sample: bool = False, copies: int = 1):
    from tunesmith.models.engine import Engine, Request, Sampling

    engine = Engine(model, tok, max_rows=rows)
    reqs = [Request(tok(p, add_special_tokens=False)["input_ids"],
                    Sampling(max_new_tokens=new, do_sample=sample, temperature=1.0, top_k=0, seed=k + 100 * i))
            for i, p in enumerate(prompts) for k in range(copies)]
    t0 = time.perf_counter()
    engine.run(reqs)
    seconds = time.perf_counter() - t0
    return [r.output_ids for r in reqs], seconds, [r.first_token - r.submitted for r in reqs]


def llama_cpp_gguf(model, tok, model_name: str, dtype: str, folder: Path) -> Path:
    """The same weights as a GGUF for llama.cpp, written by tunesmith's GGUF export (f32, or f16 for bfloat16 runs:
    llama.cpp's CPU kernels have no bfloat16 matmul of their own here)."""
    from tunesmith.export.gguf_file import write_gguf
    from tunesmith.models.load import BUNDLED, _package_dir

    spec = BUNDLED.get(model_name)
    source = _package_dir(model_name, spec, spec.package) / spec.gguf_file if spec and spec.gguf_file and not spec.parts else None
    path = folder / f"{model_name}-{dtype}.gguf"
    write_gguf(model.float(), tok, path, dtype, source_gguf=source)
    return path


def llama_cpp_run(gguf: Path, tok, model, prompts: list[str], new: int, sample: bool = False, copies: int = 1):
    """llama-cpp-python's Llama on the same prompts, one sequence at a time (its Python API decodes one sequence; a
    repeated prefix -- the system prompt, a prompt's 8 copies -- is reused from its cache, as llama.cpp does)."""
    from llama_cpp import Llama

    from tunesmith.models.engine import eos_ids

    llm = Llama(model_path=str(gguf), n_ctx=1024, n_batch=512, n_threads=torch.get_num_threads(), verbose=False)
    eos = set(eos_ids(tok, model))
    outs, firsts, t0 = [], [], time.perf_counter()
    for i, p in enumerate(prompts):
        ids = llm.tokenize(p.encode(), add_bos=False, special=True)
        for k in range(copies):
            kw = dict(temp=1.0, top_k=0, top_p=1.0, min_p=0.0) if sample else dict(temp=0.0)
            if sample:
                llm.set_seed(k + 100 * i)
            out, tb = [], time.perf_counter()
            for token in llm.generate(ids, reset=True, **kw):
                if not out:
                    firsts.append(time.perf_counter() - tb + (tb - t0))
                if token in eos:
                    out.append(token)
                    break
                out.append(token)
                if len(out) == new:
                    break
            outs.append(out)
    return outs, time.perf_counter() - t0, firsts


def row(name: str, outs, seconds: float, firsts, prompt_tokens: int, fpt: float, peak: float) -> dict:
    new = sum(len(o) for o in outs)
    gflops = (new + prompt_tokens) * fpt / seconds / 1e9
    return {"config": name, "new_tokens": new, "seconds": round(seconds, 2), "tok_s": round(new / seconds, 1),
            "ttft_s": round(statistics.mean(firsts), 2), "gflops": round(gflops, 1), "share_of_peak": round(gflops / peak, 3)}


def decode_only(model, tok, rows: int, new: int, fpt: float, peak: float) -> dict:
    """Batched decoding alone: `rows` short prompts prefilled, then `new` decode steps timed."""
    from tunesmith.models.engine import Engine, Request, Sampling

    engine = Engine(model, tok, max_rows=rows, prefill_chunk=1 << 20)
    reqs = [Request(tok(f"Count from {i} upwards:", add_special_tokens=False)["input_ids"], Sampling(max_new_tokens=new))
            for i in range(rows)]
    for r in reqs:
        engine.submit(r)
    engine.step()  # every prompt in, one decode step
    before, t0 = engine.generated_tokens, time.perf_counter()
    while any(not r.done for r in reqs):
        engine.step()
    n = engine.generated_tokens - before
    seconds = time.perf_counter() - t0
    gflops = n * fpt / seconds / 1e9
    return {"config": f"engine decode only, {rows} rows", "new_tokens": n, "seconds": round(seconds, 2),
            "tok_s": round(n / seconds, 1), "ttft_s": None, "gflops": round(gflops, 1), "share_of_peak": round(gflops / peak, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--quick", action="store_true", help="a quarter of the prompts")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the weights (both paths)")
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp rows (they need llama-cpp-python)")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE.parent / "src"))
    from tunesmith.methods.load import load_model
    from tunesmith.models import load_tokenizer, resolve_model_dir

    torch.set_num_threads(torch.get_num_threads())
    model_dir = resolve_model_dir(args.model)
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, getattr(torch, args.dtype)).eval()
    fpt = flops_per_token(model)
    peak = matmul_peak()
    k = 4 if args.quick else 1
    system = "Summarize the scientific abstract in one sentence (a TL;DR)."
    docs = [json.loads(x)["document"] for x in (DATA / "summarization_scitldr" / "test.jsonl").read_text().splitlines()]
    eval_prompts = [tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": d}],
                                            tokenize=False, add_generation_prompt=True) for d in docs[: 64 // k]]
    rl_prompts = [tok.apply_chat_template([{"role": "user", "content": f"Summarize what `{name}` does in one sentence."}],
                                          tokenize=False, add_generation_prompt=True)
                  for name in ["json.dumps", "os.path.join", "re.sub", "itertools.chain", "shutil.copy", "math.isclose",
                               "time.sleep", "heapq.heappush"][: 8 // k]]
    chats = [json.loads(x)["instruction"][:200] for x in (DATA / "instruct_mix" / "test.jsonl").read_text().splitlines()[:16]]
    chat_prompts = [tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
                    for c in chats]
    count = lambda ps, copies=1: sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in ps) * copies  # noqa: E731
    print(f"model {args.model} ({args.dtype}), {torch.get_num_threads()} threads, fp32 matmul peak {peak:.0f} GFLOP/s, "
          f"{fpt / 1e9:.3f} GFLOP per token\n")
    results = []
    gguf = None
    if not args.no_llama_cpp and importlib.util.find_spec("llama_cpp") is not None:
        gguf = llama_cpp_gguf(model, tok, args.model, "f32" if args.dtype == "float32" else "f16", Path(tempfile.mkdtemp()))
        model = model.to(getattr(torch, args.dtype))
    for shape, prompts, new, sample, copies, base in (
            ("(a) eval", eval_prompts, 32, False, 1, [("model.generate, batches of 16", 16)]),
            ("(b) RL", rl_prompts, 64, True, 8, [("model.generate, 2 prompts x 8 per call", 2)]),
            ("(c) chat", chat_prompts, 48, False, 1, [("model.generate, one at a time", 1), ("model.generate, a batch of 16", 16)])):
        tokens = count(prompts, copies)
        for name, batch in base:
            outs, secs, firsts = hf(model, tok, prompts, new, batch, sample, copies)
            results.append({"shape": shape, **row(name, outs, secs, firsts, tokens, fpt, peak)})
            print(results[-1], flush=True)
        outs, secs, firsts = engine_run(model, tok, prompts, new, rows=64, sample=sample, copies=copies)
        results.append({"shape": shape, **row("engine, 64 rows", outs, secs, firsts, tokens, fpt, peak)})
        print(results[-1], flush=True)
        engine_outs = outs
        if gguf:
            outs, secs, firsts = llama_cpp_run(gguf, tok, model, prompts, new, sample, copies)
            results.append({"shape": shape, **row(f"llama.cpp ({gguf.stem.rsplit('-', 1)[1]} GGUF), one sequence at a time",
                                                  outs, secs, firsts, tokens, fpt, peak)})
            if not sample:
                results[-1]["same_as_engine"] = f"{sum(a == b for a, b in zip(outs, engine_outs))}/{len(outs)}"
            print(results[-1], flush=True)
            outs = engine_outs
        if not sample:  # greedy: the same answers
            ref, _, _ = hf(model, tok, prompts, new, 1)
            same = sum(a == b for a, b in zip(ref, outs))
            print(f"  greedy answers equal to model.generate one at a time: {same}/{len(ref)}")
            results[-1]["same_as_generate"] = f"{same}/{len(ref)}"
    results.append({"shape": "decode", **decode_only(model, tok, 64, 48, fpt, peak)})
    print(results[-1])
    print("\n| shape | config | tok/s | x model.generate | mean time to first token s | GFLOP/s | share of fp32 peak |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        base = next((b for b in results if b["shape"] == r["shape"]), r)
        print(f"| {r['shape']} | {r['config']} | {r['tok_s']} | {r['tok_s'] / base['tok_s']:.2f} | {r['ttft_s']} | "
              f"{r['gflops']} | {100 * r['share_of_peak']:.0f}% |")
    print(f"\nfp32 matmul peak {peak:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
