"""`tunesmith serve`: an OpenAI-compatible HTTP API on FastAPI + uvicorn.

Endpoints: /v1/chat/completions and /v1/completions (with and without `stream`), /v1/models, /health. One base model
in memory; each run's adapter is loaded onto it under the run's name and chosen per request by `model` (or merged into
the base when there is only one and `--merge` is given). Every request, streaming or not, goes to one generation
engine (models/engine.py): one worker thread runs continuous batching over all of them, rows of several adapters in
one batch, and hands each request its text through a queue of its own. So:

  * no lock is held across network I/O, and no thread waits on a client: a slow or vanished client blocks nobody;
  * concurrent streams are generated together, not one after another;
  * a client that hangs up cancels its generation at the next step; a stop string ends it at once;
  * a generation that fails ends its own request (a JSON error, or an SSE error event then [DONE]) and nothing else;
  * admission is bounded: past `max_waiting` queued requests the answer is 429 with Retry-After; `max_tokens` is
    capped by `max_tokens_cap`; bodies over `max_body_bytes` get 413, chunked ones too (the bytes are counted);
  * `--api-key` requires `Authorization: Bearer KEY` on /v1, checked from the headers before any of the body is read;
    a non-loopback bind without one is refused unless `--insecure`; on loopback only loopback Host headers are served
    (a web page cannot rebind a name to it);
  * /health says whether the engine's worker is alive (503 when it is not); error bodies carry no traceback or path.

Prompts are rendered as each run was trained (data.render.PromptFormat: its chat template and system prompt, or its
text template); /v1/completions takes the prompt as it is. Rendering and tokenising run in a worker thread, not on the
event loop (a 1 MiB prompt takes seconds to tokenise), and a prompt longer than the context times `chars_per_token`
characters (32: more than any tokenizer averages) is refused before it is tokenised, so one request's tokenising is
bounded by the model's context, not by the body limit. A request without `max_tokens` may generate the rest of the
context (OpenAI's default), within `max_tokens_cap`. `seed` is a signed 64-bit integer; a request whose completions
cannot all be submitted cancels those that were.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from fastapi import Request as HTTPRequest
from pydantic import BaseModel, ConfigDict, Field

from tunesmith.data.render import PromptFormat
from tunesmith.models.engine import BASE, Engine, EngineFull, Request, Sampling, supports
from tunesmith.models.generate import SerialEngine

log = logging.getLogger("tunesmith.serve")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclass
class ServedModel:
    name: str                       # the id clients ask for
    adapter: Optional[str]          # peft adapter name (BASE: the base with adapters off; None: the model as it is)
    prompts: PromptFormat = field(default_factory=PromptFormat)


@dataclass
class Served:
    engine: Engine
    tokenizer: object
    models: dict[str, ServedModel]
    context: int = 2048
    max_tokens_cap: int = 1024
    max_body_bytes: int = 1 << 20
    max_prompts: int = 16           # prompts in one /v1/completions call
    chars_per_token: int = 32       # a prompt over context x this many characters cannot fit: refused untokenised
    api_key: Optional[str] = None
    loopback_only_hosts: bool = True  # serve only requests whose Host is a loopback name (a loopback bind)

    @property
    def names(self) -> list[str]:
        return list(self.models)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str
    name: Optional[str] = None


class Common(BaseModel):
    """OpenAI's fields; a field this server does not know is an error naming it (not silently ignored)."""
    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)                 # extension (0: off)
    repetition_penalty: float = Field(1.0, gt=0)  # extension
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[dict] = None
    seed: Optional[int] = Field(None, ge=-2**63, lt=2**63)  # what torch.Generator.manual_seed takes (int64)
    n: int = Field(1, ge=1, le=8)
    user: Optional[str] = None
    presence_penalty: float = Field(0.0, ge=0, le=0)   # accepted at 0, the only value served
    frequency_penalty: float = Field(0.0, ge=0, le=0)
    logprobs: Optional[bool] = Field(None)

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise ValueError("stop: at most 4 stop sequences")
        return [s for s in stops if s]


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Common):
    prompt: Union[str, list[str]]
    echo: bool = False


@dataclass
class Target:
    """What a request's `model` names: the engine that generates for it and how its prompts are built."""
    engine: Engine
    tokenizer: object
    model: ServedModel
    context: int


async def _served_target(served: Served, name: str) -> Optional[Target]:
    model = served.models.get(name)
    return Target(served.engine, served.tokenizer, model, served.context) if model else None


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
    """An error body as OpenAI's API shapes it (what its SDK parses into `openai.APIStatusError`)."""
    from fastapi.responses import JSONResponse

    kind = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def add_error_handlers(app, log=log) -> None:
    """OpenAI-shaped error bodies for validation errors, HTTP errors (their headers kept) and anything raised, which
    gets a reference and leaves its traceback in the server's log only (`tunesmith serve` and the studio)."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"] if x != "body")
        what = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
        return openai_error(400, f"{where}: {what}", where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return openai_error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def failed(request, exc):
        ref = uuid.uuid4().hex[:12]
        log.exception("request %s failed", ref)  # the traceback stays in the server's log
        return openai_error(500, f"internal error (reference {ref})")


def harden(app, guard, body_limit=None) -> None:
    """Errors in OpenAI's shape with no traceback or path in them; only loopback Host headers on a loopback bind; the
    API key on /v1; bodies past the limit refused, counted as they arrive.
    `guard` is read on every request (its api_key may change); `body_limit(path)` gives a path its own limit."""
    limit_for = body_limit or (lambda path: guard.max_body_bytes)
    add_error_handlers(app)
    app.add_middleware(_Check, guard=guard, limit_for=limit_for)


def build_app(served: Served):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI(title="tunesmith", docs_url=None, redoc_url=None, openapi_url=None)
    harden(app, served)

    @app.get("/health")
    async def health():
        alive = served.engine.alive
        body = {"status": "ok" if alive else "generation worker not running", "pending": served.engine.pending()}
        if not served.api_key:
            body["models"] = served.names
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "tunesmith"}
                                           for n in served.names]}

    add_generation_routes(app, lambda name: _served_target(served, name), lambda: served.names, served)

    @app.on_event("shutdown")
    async def stop_engine():
        served.engine.stop()

    served.engine.start()
    return app


def add_generation_routes(app, target, names, limits) -> None:
    """/v1/chat/completions and /v1/completions. `await target(name)` is the Target a request's `model` names (None:
    a 404 listing `names()`); `limits` carries max_tokens_cap, max_prompts and chars_per_token (read per request)."""
    from fastapi.responses import StreamingResponse

    error = openai_error

    def unknown(name: str):
        return error(404, f"model {name!r} does not exist; available: {', '.join(names())}", "model", "model_not_found")

    def prepare(t: Target, req: Common, prompt: str, special: bool):
        if len(prompt) > t.context * limits.chars_per_token:  # bounded work: no tokenizer averages more per token
            return None, error(400, f"this model's context is {t.context} tokens; the prompt has {len(prompt)} "
                                    f"characters, more than {limits.chars_per_token} per token of context",
                               "messages", "context_length_exceeded")
        ids = t.tokenizer(prompt, add_special_tokens=special)["input_ids"]
        if not ids:
            return None, error(400, "the prompt is empty: there is nothing to continue", "prompt")
        wanted = req.max_completion_tokens or req.max_tokens
        if wanted is None:  # OpenAI's default: the rest of the context (within the server's cap)
            if len(ids) >= t.context:
                return None, error(400, f"this model's context is {t.context} tokens; the prompt has {len(ids)}, "
                                        "leaving none to generate", "messages", "context_length_exceeded")
            wanted = t.context - len(ids)
        max_new = min(wanted, limits.max_tokens_cap)
        if len(ids) + max_new > t.context:
            return None, error(400, f"this model's context is {t.context} tokens; the prompt has {len(ids)} and "
                                    f"{max_new} more were requested", "messages", "context_length_exceeded")
        try:
            stops = req.stops()
        except ValueError as e:
            return None, error(400, str(e), "stop")
        sampling = Sampling(max_new_tokens=max_new, do_sample=req.temperature >= 1e-5, temperature=req.temperature,
                            top_p=req.top_p, top_k=req.top_k, repetition_penalty=req.repetition_penalty,
                            seed=req.seed if req.seed is not None else uuid.uuid4().int & 0x7FFFFFFF)
        return (ids, sampling, stops), None

    def render_and_prepare(t: Target, req: ChatRequest):
        fmt = t.model.prompts
        prompt = fmt.render([m.model_dump(exclude_none=True) for m in req.messages], t.tokenizer)
        return prepare(t, req, prompt, fmt.add_special_tokens)

    def prepare_all(t: Target, req: CompletionRequest, prompts: list[str]):
        prepared = []
        for prompt in prompts:
            ready, err = prepare(t, req, prompt, False)
            if err:
                return None, err
            prepared.append(ready)
        return prepared, None

    async def submit_all(t: Target, req: Common, prepared: list, stream: bool):
        """Submit n completions of each prompt; returns (requests, queue of (index, kind, value)) or an error."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        reqs = []
        for p, (ids, sampling, stops) in enumerate(prepared):
            for k in range(req.n):
                index = p * req.n + k
                s = sampling if k == 0 else Sampling(**{**sampling.__dict__, "seed": _wrap_seed(sampling.seed + k)})
                reqs.append(Request(list(ids), s, stops, t.model.adapter,
                                    on_text=(lambda x, i=index: loop.call_soon_threadsafe(queue.put_nowait, (i, "text", x)))
                                    if stream else None,
                                    on_done=lambda r, i=index: loop.call_soon_threadsafe(queue.put_nowait, (i, "done", r))))
        submitted = []
        try:
            for r in reqs:
                submitted.append(t.engine.submit(r))
        except EngineFull:
            for r in submitted:
                r.cancel()
            return None, None, error(429, "the server is busy: too many requests are waiting; retry shortly",
                                     code="rate_limit_exceeded", headers={"Retry-After": "1"})
        except Exception:  # nothing of this request may go on generating for nobody
            for r in submitted:
                r.cancel()
            raise
        return reqs, queue, None

    async def wait_all(http: HTTPRequest, reqs: list[Request], queue: asyncio.Queue) -> bool:
        """Wait for every request; False when the client hung up (then they are cancelled)."""
        left = len(reqs)
        while left:
            try:
                _, kind, _ = await asyncio.wait_for(queue.get(), timeout=0.5)
                left -= kind == "done"
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    for r in reqs:
                        r.cancel()
                    return False
        return True

    async def outcome(http: HTTPRequest, reqs: list[Request], queue: asyncio.Queue):
        """None when every request finished, else the error response (the client left; a generation failed)."""
        if not await wait_all(http, reqs, queue):
            return error(499, "client closed the request")
        failed = next((r for r in reqs if r.finish_reason == "error"), None)
        return error(500, f"generation failed: {_public(failed.error)}") if failed else None

    def finish_reason(r: Request) -> str:
        return "length" if r.finish_reason == "length" else "stop"

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, http: HTTPRequest):
        t = await target(req.model)
        if t is None:
            return unknown(req.model)
        fmt = t.model.prompts
        if fmt.template == "chat" and not getattr(t.tokenizer, "chat_template", None):
            return error(400, "this model has no chat template; use /v1/completions with a prompt", "messages")
        ready, err = await asyncio.to_thread(render_and_prepare, t, req)  # off the event loop: a 1 MiB prompt takes seconds
        if err:
            return err
        reqs, queue, err = await submit_all(t, req, [ready], req.stream)
        if err:
            return err
        cid, created, n_prompt = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), len(ready[0])
        if req.stream:
            return StreamingResponse(_chat_stream(http, reqs, queue, cid, created, req.model, finish_reason),
                                     media_type="text/event-stream")
        if err := await outcome(http, reqs, queue):
            return err
        used = sum(len(r.output_ids) for r in reqs)
        return {"id": cid, "object": "chat.completion", "created": created, "model": req.model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": r.text},
                             "finish_reason": finish_reason(r), "logprobs": None} for i, r in enumerate(reqs)],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": used, "total_tokens": n_prompt + used}}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, http: HTTPRequest):
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            return error(400, "prompt must not be empty", "prompt")
        if len(prompts) > limits.max_prompts:
            return error(400, f"at most {limits.max_prompts} prompts in one request", "prompt")
        t = await target(req.model)
        if t is None:
            return unknown(req.model)
        prepared, err = await asyncio.to_thread(prepare_all, t, req, prompts)  # off the event loop, as in chat
        if err:
            return err
        reqs, queue, err = await submit_all(t, req, prepared, req.stream)
        if err:
            return err
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            return StreamingResponse(_completion_stream(http, reqs, queue, cid, created, req.model, finish_reason),
                                     media_type="text/event-stream")
        if err := await outcome(http, reqs, queue):
            return err
        n_prompt = sum(len(p[0]) for p in prepared)
        used = sum(len(r.output_ids) for r in reqs)
        return {"id": cid, "object": "text_completion", "created": created, "model": req.model,
                "choices": [{"index": i, "text": (prompts[i // req.n] if req.echo else "") + r.text,
                             "finish_reason": finish_reason(r), "logprobs": None} for i, r in enumerate(reqs)],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": used, "total_tokens": n_prompt + used}}


async def _events(http, reqs: list[Request], queue: asyncio.Queue):
    """(index, kind, value) as the engine produces them until every request is done; cancels them when the client
    goes away (the response generator is closed, or the connection reports a disconnect)."""
    left = len(reqs)
    try:
        while left:
            try:
                item = await asyncio.wait_for(queue.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    return
                continue
            left -= item[1] == "done"
            yield item
    finally:
        for r in reqs:
            if not r.done:
                r.cancel()


async def _chat_stream(http, reqs, queue, cid, created, model, finish_reason):
    def chunk(index: int, delta: dict, finish=None) -> str:
        return "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                                      "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}) + "\n\n"

    for i in range(len(reqs)):
        yield chunk(i, {"role": "assistant", "content": ""})
    async for index, kind, value in _events(http, reqs, queue):
        if kind == "text" and value:
            yield chunk(index, {"content": value})
        elif kind == "done":
            if value.finish_reason == "error":
                yield "data: " + json.dumps({"error": {"message": f"generation failed: {_public(value.error)}",
                                                       "type": "server_error"}}) + "\n\n"
            yield chunk(index, {}, finish_reason(value))
    yield "data: [DONE]\n\n"


async def _completion_stream(http, reqs, queue, cid, created, model, finish_reason):
    def chunk(index: int, text: str, finish=None) -> str:
        return "data: " + json.dumps({"id": cid, "object": "text_completion", "created": created, "model": model,
                                      "choices": [{"index": index, "text": text, "finish_reason": finish,
                                                   "logprobs": None}]}) + "\n\n"

    async for index, kind, value in _events(http, reqs, queue):
        if kind == "text" and value:
            yield chunk(index, value)
        elif kind == "done":
            if value.finish_reason == "error":
                yield "data: " + json.dumps({"error": {"message": f"generation failed: {_public(value.error)}",
                                                       "type": "server_error"}}) + "\n\n"
            yield chunk(index, "", finish_reason(value))
    yield "data: [DONE]\n\n"


def _wrap_seed(seed: int) -> int:
    """`seed` folded into the signed 64-bit range torch's generators take (seed + k of the k-th completion)."""
    return (seed + 2**63) % 2**64 - 2**63


def _public(message: str | None) -> str:
    """A failure's kind for the client (an out-of-memory, ...), without the paths and tensors its message may hold."""
    return (message or "unknown").split(":")[0]


def _host(header: str) -> str:
    if header.startswith("["):
        return header[: header.find("]") + 1]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class _Check:
    """The ASGI middleware of `harden`: Host and key are checked from the headers alone, before a byte of the body is
    read (an unauthenticated client cannot make the server hold its body); then `limit_body`."""

    def __init__(self, app, guard, limit_for):
        self.app, self.guard, self.limit_for = app, guard, limit_for

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.guard.loopback_only_hosts and _host(headers.get("host", "")) not in LOOPBACK_HOSTS:
            return await openai_error(400, "this server answers requests to a loopback address only")(scope, receive, send)
        key = self.guard.api_key
        if key and scope["path"].startswith("/v1"):
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode("utf-8", "replace"), f"Bearer {key}".encode()):
                return await openai_error(401, "a valid API key is required (Authorization: Bearer KEY)")(
                    scope, receive, send)
        await limit_body(self.app, scope, receive, send, self.limit_for(scope["path"]), headers)


async def limit_body(app, scope, receive, send, limit: int, headers: dict) -> None:
    """Run the ASGI `app` on an http request whose body may be at most `limit` bytes: a Content-Length past it is
    answered 413 at once; a chunked body is counted as the application reads it and answered 413 the moment it passes
    the limit (the application is told the client left). Nothing is buffered here."""
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return await openai_error(413, f"request body larger than {limit} bytes")(scope, receive, send)
    state = {"size": 0, "over": False, "started": False}

    async def counted():
        message = await receive()
        if message["type"] == "http.request":
            state["size"] += len(message.get("body", b""))
            if state["size"] > limit:
                state["over"] = True
                return {"type": "http.disconnect"}  # the application stops reading; the answer is ours
        return message

    async def guarded_send(message):
        if state["over"]:
            return
        if message["type"] == "http.response.start":
            state["started"] = True
        await send(message)

    try:
        await app(scope, counted, guarded_send)
    except Exception:
        if not state["over"]:
            raise
    if state["over"] and not state["started"]:
        await openai_error(413, f"request body larger than {limit} bytes")(scope, receive, send)


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_served(sources: list[str], merge: bool, log=print, **limits) -> Served:
    """One source: a run directory or any model `model.name` accepts. Several: runs whose adapters share one base, each
    served under its run's name (plus the base itself under its own name when `base_name` is given in `limits`)."""
    from pathlib import Path

    from peft import PeftModel

    from tunesmith.errors import TunesmithError
    from tunesmith.methods.load import _base_dir, load_model, merge_adapter, prompt_format
    from tunesmith.models import inference_dtype, load_tokenizer, pick_device, resolve_model_dir
    from tunesmith.run import RunDir

    base_name = limits.pop("base_name", None)
    rows = limits.pop("max_rows", 32)
    max_waiting = limits.pop("max_waiting", 256)
    device = pick_device()
    dtype = inference_dtype(device)
    dirs = [resolve_model_dir(s) for s in sources]
    names = [Path(s).name if RunDir(s).is_finished() else Path(s).name if Path(s).exists() else s for s in sources]
    tokenizer = load_tokenizer(dirs[0])
    if not all((d / "adapter_config.json").exists() for d in dirs):
        if len(dirs) > 1:
            raise TunesmithError("several models in one server must be adapter runs (LoRA, IA3, ...) on the same base model")
        model = load_model(dirs[0], dtype, device)
        served = {names[0]: ServedModel(names[0], None, prompt_format(dirs[0]))}
    else:
        bases = {str(_base_dir(d, json.loads((d / "adapter_config.json").read_text())["base_model_name_or_path"])) for d in dirs}
        if len(bases) > 1:
            raise TunesmithError(f"the adapters were trained on different base models ({', '.join(sorted(bases))}); serve them separately")
        base_dir = Path(bases.pop())
        base = merge_adapter(load_model(base_dir, dtype, device))  # the base may be a tuned adapter run (a DPO child)
        model = PeftModel.from_pretrained(base, dirs[0], adapter_name=names[0])
        for name, d in zip(names[1:], dirs[1:]):
            model.load_adapter(d, adapter_name=name)
        served = {n: ServedModel(n, n, prompt_format(d)) for n, d in zip(names, dirs)}
        if len(dirs) == 1 and merge and not model.active_peft_config.is_prompt_learning:
            model = model.merge_and_unload()
            served = {names[0]: ServedModel(names[0], None, prompt_format(dirs[0]))}
            log(f"serving {names[0]} with its adapter merged into the base")
        elif base_name:
            served[base_name] = ServedModel(base_name, BASE, prompt_format(base_dir))
    context = min(getattr(model.config, "max_position_embeddings", 2048) or 2048, 8192)
    if supports(model) is None:
        engine = Engine(model.eval(), tokenizer, max_rows=rows, max_waiting=max_waiting)
    else:  # prompt/prefix tuning: one request at a time through model.generate
        engine = SerialEngine(model, tokenizer, max_waiting=max_waiting)
        log(f"serving {', '.join(served)} one request at a time ({supports(model)})")
    return Served(engine, tokenizer, served, context, **limits)
