"""`tunesmith serve`: an OpenAI-compatible HTTP API on FastAPI + uvicorn.

Endpoints: /v1/chat/completions (with and without `stream`), /v1/completions, /v1/models, /health.
One base model in memory; each run's adapter is loaded onto it under the run's name and chosen per
request by `model` (or merged into the base when there is only one and `--merge` is given).
Non-streaming requests wait in a queue; a worker takes up to `max_batch` compatible ones (same
model and sampling settings) that arrive within a few milliseconds of each other and generates
them as one left-padded batch, which on a CPU gives several times the throughput of one-by-one
generation. Streaming requests run on their own. The event loop stays free, so /health answers
while a generation runs. Bad requests get
a 4xx JSON error in OpenAI's shape; an unexpected failure is a 500 for that request, never a crash.
"""
from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import torch
from pydantic import BaseModel, Field
from transformers import TextIteratorStreamer

from tunesmith.models.generate import eos_ids

MAX_BODY_BYTES = 1 << 20


@dataclass
class Served:
    model: object                  # the (peft) model
    tokenizer: object
    names: list[str]               # model ids clients may ask for
    adapters: dict[str, Optional[str]] = field(default_factory=dict)  # model id -> peft adapter name (None = base)
    context: int = 2048
    max_tokens_cap: int = 1024
    lock: threading.Lock = field(default_factory=threading.Lock)
    max_batch: int = 8
    batcher: Optional["Batcher"] = None


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class Common(BaseModel):
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    seed: Optional[int] = None


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Common):
    prompt: Union[str, list[str]]


def build_app(served: Served):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

    app = FastAPI(title="tunesmith")

    def error(status: int, message: str, param: str | None = None, code: str | None = None):
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"] if x != "body")
        return error(400, f"{where}: {first['msg']}", where or None)

    @app.exception_handler(Exception)
    async def failed(request, exc):
        return error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            return error(413, f"request body larger than {MAX_BODY_BYTES} bytes")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": served.names}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "tunesmith"} for n in served.names]}

    def prepare(req: Common, prompt: str):
        if req.model not in served.names:
            return None, error(404, f"model {req.model!r} does not exist; available: {', '.join(served.names)}", "model", "model_not_found")
        ids = served.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        max_new = min(req.max_tokens or 256, served.max_tokens_cap)
        if ids.shape[1] + max_new > served.context:
            return None, error(400, f"this model's context is {served.context} tokens; the prompt has {ids.shape[1]} and "
                                    f"{max_new} more were requested", "messages", "context_length_exceeded")
        return (ids, max_new), None

    def gen_kwargs(req: Common, ids, max_new, streamer=None):
        kw = dict(input_ids=ids.to(_device(served.model)), attention_mask=torch.ones_like(ids).to(_device(served.model)),
                  max_new_tokens=max_new, eos_token_id=eos_ids(served.tokenizer, served.model),
                  pad_token_id=served.tokenizer.pad_token_id, streamer=streamer)
        if req.temperature > 0:
            kw.update(do_sample=True, temperature=req.temperature, top_p=req.top_p, top_k=0)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kw

    served.batcher = served.batcher or Batcher(served, gen_kwargs)

    def run(req: Common, ids, max_new) -> tuple[str, str, int]:
        out, ended = served.batcher.submit(req, ids, max_new).result()
        text = served.tokenizer.decode(out, skip_special_tokens=True)
        text, stopped = _apply_stop(text, req.stop)
        return text, "stop" if ended or stopped else "length", len(out)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        prompt = served.tokenizer.apply_chat_template([m.model_dump() for m in req.messages], tokenize=False,
                                                      add_generation_prompt=True)
        ready, err = prepare(req, prompt)
        if err:
            return err
        ids, max_new = ready
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            return StreamingResponse(iterate_in_threadpool(_stream_chat(served, req, ids, max_new, cid, created, gen_kwargs)),
                                     media_type="text/event-stream")
        text, finish, n = await run_in_threadpool(run, req, ids, max_new)
        return {"id": cid, "object": "chat.completion", "created": created, "model": req.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                "usage": {"prompt_tokens": ids.shape[1], "completion_tokens": n, "total_tokens": ids.shape[1] + n}}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        if req.stream:
            return error(400, "stream is not supported on /v1/completions; use /v1/chat/completions", "stream")
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            return error(400, "prompt must not be empty", "prompt")
        choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0}
        for i, prompt in enumerate(prompts):
            ready, err = prepare(req, prompt)
            if err:
                return err
            ids, max_new = ready
            text, finish, n = await run_in_threadpool(run, req, ids, max_new)
            choices.append({"index": i, "text": text, "finish_reason": finish, "logprobs": None})
            usage["prompt_tokens"] += ids.shape[1]
            usage["completion_tokens"] += n
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": req.model, "choices": choices, "usage": usage}

    return app


class Batcher:
    """One worker thread generating queued requests in batches of compatible ones."""

    WINDOW = 0.01  # seconds to wait for more requests to join a batch

    def __init__(self, served: Served, gen_kwargs):
        import queue

        self.served, self.gen_kwargs, self.queue = served, gen_kwargs, queue.Queue()
        threading.Thread(target=self._work, daemon=True).start()

    def submit(self, req, ids, max_new):
        from concurrent.futures import Future

        fut = Future()
        self.queue.put((req, ids, max_new, fut))
        return fut

    @staticmethod
    def _key(req):
        return (req.model, req.temperature, req.top_p, req.seed)

    def _work(self) -> None:
        import queue

        waiting = []
        while True:
            first = waiting.pop(0) if waiting else self.queue.get()
            batch, deadline = [first], time.monotonic() + self.WINDOW
            key = self._key(first[0])
            while len(batch) < self.served.max_batch and first[0].seed is None:
                try:
                    item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                (batch if self._key(item[0]) == key else waiting).append(item)
            try:
                results = self._generate(batch)
            except Exception as e:  # the requests fail, the worker lives on
                for *_, fut in batch:
                    fut.set_exception(e)
                continue
            for (*_, fut), result in zip(batch, results):
                fut.set_result(result)

    def _generate(self, batch) -> list[tuple[list[int], bool]]:
        served, pad = self.served, self.served.tokenizer.pad_token_id
        req = batch[0][0]
        width = max(ids.shape[1] for _, ids, _, _ in batch)
        rows = [torch.cat([torch.full((1, width - ids.shape[1]), pad, dtype=ids.dtype), ids], 1) for _, ids, _, _ in batch]
        mask = [torch.cat([torch.zeros(1, width - ids.shape[1], dtype=ids.dtype), torch.ones_like(ids)], 1) for _, ids, _, _ in batch]
        max_new = max(m for _, _, m, _ in batch)
        kw = self.gen_kwargs(req, torch.cat(rows), max_new)
        kw["attention_mask"] = torch.cat(mask).to(kw["input_ids"].device)
        eos = set(eos_ids(served.tokenizer, served.model))
        with served.lock:
            _select(served, req.model)
            if req.seed is not None:
                torch.manual_seed(req.seed)
            with torch.no_grad():
                out = served.model.generate(**kw)[:, width:].tolist()
        results = []
        for row, (_, _, own_max, _) in zip(out, batch):
            row = row[:own_max]
            end = next((i for i, t in enumerate(row) if t in eos), None)
            results.append((row[: end + 1] if end is not None else row, end is not None))
        return results


def _stream_chat(served: Served, req, ids, max_new, cid, created, gen_kwargs):
    import json

    def chunk(delta: dict, finish=None) -> str:
        return "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                                      "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"

    with served.lock:
        _select(served, req.model)
        streamer = TextIteratorStreamer(served.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        result: list = []
        worker = threading.Thread(target=lambda: result.append(_generate_quietly(served.model, gen_kwargs(req, ids, max_new, streamer))))
        worker.start()
        yield chunk({"role": "assistant", "content": ""})
        text, finish = "", "length"
        for piece in streamer:
            text += piece
            cut, stopped = _apply_stop(text, req.stop)
            if stopped:
                if len(cut) > len(text) - len(piece):
                    yield chunk({"content": cut[len(text) - len(piece):]})
                finish = "stop"
                break
            if piece:
                yield chunk({"content": piece})
        worker.join()
    if finish != "stop" and result:
        new = result[0][0, ids.shape[1]:].tolist()
        finish = "stop" if new and new[-1] in eos_ids(served.tokenizer, served.model) else "length"
    yield chunk({}, finish)
    yield "data: [DONE]\n\n"


def _generate_quietly(model, kwargs):
    with torch.no_grad():
        return model.generate(**kwargs)


def _apply_stop(text: str, stop) -> tuple[str, bool]:
    stops = [stop] if isinstance(stop, str) else (stop or [])
    hits = [text.index(s) for s in stops if s and s in text]
    return (text[: min(hits)], True) if hits else (text, False)


def _select(served: Served, name: str) -> None:
    adapter = served.adapters.get(name)
    if adapter is not None:
        served.model.set_adapter(adapter)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def load_served(sources: list[str], merge: bool, log=print) -> Served:
    """One source: a run directory or any model `model.name` accepts. Several: runs whose adapters
    share one base, each served under its run's name."""
    import json
    from pathlib import Path

    from peft import PeftModel

    from tunesmith.errors import TunesmithError
    from tunesmith.methods.load import load_model
    from tunesmith.models import inference_dtype, load_tokenizer, pick_device, resolve_model_dir
    from tunesmith.run import RunDir

    device = pick_device()
    dtype = inference_dtype(device)
    dirs = [resolve_model_dir(s) for s in sources]
    names = [Path(s).name if RunDir(s).is_finished() else s for s in sources]
    tokenizer = load_tokenizer(dirs[0])
    adapters: dict[str, Optional[str]] = {}
    if not all((d / "adapter_config.json").exists() for d in dirs):
        if len(dirs) > 1:
            raise TunesmithError("several models in one server must be adapter runs (LoRA, IA3, ...) on the same base model")
        model = load_model(dirs[0], dtype, device)
    else:
        bases = {json.loads((d / "adapter_config.json").read_text())["base_model_name_or_path"] for d in dirs}
        if len(bases) > 1:
            raise TunesmithError(f"the adapters were trained on different base models ({', '.join(sorted(bases))}); serve them separately")
        model = PeftModel.from_pretrained(load_model(resolve_model_dir(bases.pop()), dtype, device), dirs[0], adapter_name=names[0])
        for name, d in zip(names[1:], dirs[1:]):
            model.load_adapter(d, adapter_name=name)
        adapters = {n: n for n in names}
        if len(dirs) == 1 and merge and not model.active_peft_config.is_prompt_learning:
            model, adapters = model.merge_and_unload(), {}
            log(f"serving {names[0]} with its adapter merged into the base")
    context = min(getattr(model.config, "max_position_embeddings", 2048) or 2048, 8192)
    return Served(model.eval(), tokenizer, names, adapters, context)
