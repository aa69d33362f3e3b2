"""What the studio does for the Tinker training API (tinker_routes.py is its HTTP side): training clients as LoRA
adapters on one shared base model, their primitives run on tunesmith's own model code, and futures for the SDK to
poll.

  * One base model in memory per base (a `Host`), wrapped once by peft; each training client is an adapter of its
    own on it (tunesmith's LoRA: `methods.lora`'s one-GEMM layer, alpha 32 as tunesmith's default and Tinker's), with
    an AdamW of its own (torch's fused AdamW, as `train.schedule.adamw` builds it for training runs). A sampler is a
    frozen copy of an adapter (or the base with adapters off).
  * All work on a base runs in order on that host's one worker thread: a forward/backward, a step, a sample and a
    save never overlap on the shared weights, and each client's requests keep the order it sent them in. Requests
    return a future at once; `retrieve` answers when it is done (the SDK polls).
  * forward_backward / forward: per-token log-probs of the target tokens through `models.heads.hidden_and_head` (the
    backbone's hidden states, the output head on them: the split training uses), in passes of at most
    `pass_tokens` tokens, each pass's loss summed and backpropagated at once (sum losses add exactly). The losses are
    Tinker's, summed over tokens: cross_entropy -sum(w * logp); importance_sampling -sum(exp(logp - q) * A); ppo
    -sum(min(r A, clip(r, lo, hi) A)) with lo/hi from loss_fn_config (0.8 / 1.2); cispo -sum(sg(clip(r, lo, hi)) *
    logp * A). Gradients accumulate until optim_step, which clips (grad_clip_norm > 0), steps and zeroes them: with
    weights 1 / (label tokens) one forward_backward + optim_step is one tunesmith training step (tests/test_tinker.py).
  * sample: the prompt and `num_samples` requests through the generation engine (`models.engine`: continuous
    batching, seeded per request); the sampled tokens' log-probs (and the prompt's, when asked) come from one scoring
    pass afterwards, of the model's own distribution (temperature 1), which is what forward computes for them.
  * save_state / load_state: the adapter (a plain peft folder) and the optimizer's state, under
    `HOME/tinker/<training run>/<kind>/<name>`, named `tinker://<training run>/<kind>/<name>`. `export_run` turns a
    saved state into a studio run folder (`HOME/runs/<name>`, its `final/` the adapter) that the page and the
    OpenAI endpoints serve like any run.
  * A session that sends nothing (the SDK heartbeats every 10 s) and has no work queued or running for
    `idle_seconds` is closed: its adapters, optimizers and samplers are deleted, and a base with nothing left on it is
    freed; a late request gets 404. A client that hangs up leaves at most the work it had queued, which runs out.
"""
from __future__ import annotations

import json
import logging
import math
import queue
import re
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from tunesmith.studio import tinker_protocol as proto

log = logging.getLogger("tunesmith.studio.tinker")

LORA_ALPHA = 32.0
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
PATH_RE = re.compile(r"^tinker://([A-Za-z0-9:_-]{1,120})/(weights|sampler_weights)/([A-Za-z0-9][A-Za-z0-9._-]{0,99})$")
SNAPSHOTS_KEPT = 4  # a training client's unnamed sampler snapshots kept in memory (RL makes one per step)


class UserError(Exception):
    """The request is wrong: answered 400 (or `status`) with this message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Limits:
    idle_seconds: float = 600.0
    max_request_tokens: int = 65536     # tokens in one forward/backward request
    pass_tokens: int = 2048             # tokens per forward pass (activation memory)
    max_samples: int = 64
    max_sample_tokens: int = 1024
    max_adapters: int = 64              # adapters held (training clients, snapshots, loaded samplers), all bases
    futures_kept_seconds: float = 900.0


@dataclass
class Future:
    id: str
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None          # dict (JSON) or bytes (protobuf)
    error: Optional[str] = None
    category: str = "server"
    finished: float = 0.0
    session_id: Optional[str] = None     # polling for it counts as the session being alive
    _waiters: list = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def finish(self, result: Any = None, error: Optional[str] = None, category: str = "server") -> None:
        with self._lock:
            self.result, self.error, self.category = result, error, category
            self.finished = time.monotonic()
            self.done.set()
            waiters, self._waiters = self._waiters, []
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    def wake_when_done(self, loop, event) -> bool:
        """Set the asyncio `event` (on `loop`) when this finishes; False if it has finished already."""
        with self._lock:
            if self.done.is_set():
                return False
            self._waiters.append((loop, event))
            return True


def _run_reporting(fut: Future, work: Callable[[], Any]) -> None:
    try:
        fut.finish(work())
    except UserError as e:
        fut.finish(error=str(e), category="user")
    except Exception:  # the traceback stays in the server's log
        ref = secrets.token_hex(6)
        log.exception("tinker request %s failed (reference %s)", fut.id, ref)
        fut.finish(error=f"internal error (reference {ref})", category="server")


@dataclass
class SampleJob:
    """A sample request waiting on its host's worker; queued ones run together in one engine batch."""
    fut: Future
    check: Callable[[], None]            # raises UserError when the sampler was closed meanwhile
    adapter: Optional[str]
    prompt: list[int]
    n: int
    params: Any
    max_tokens: int
    prompt_logprobs: bool
    last_n: Optional[int]


@dataclass
class Host:
    """One base model in memory and the worker thread that runs everything on it."""
    key: str
    model_dir: Path
    tokenizer: Any
    model: Any                           # the base, or the peft model once an adapter exists
    jobs: "queue.Queue[Optional[Callable[[], None]]]" = field(default_factory=queue.Queue)
    adapters: set = field(default_factory=set)
    engine: Any = None
    engine_for: int = 0                  # id() of the model the engine was built on
    thread: Optional[threading.Thread] = None


@dataclass
class TrainingModel:
    model_id: str
    session_id: str
    base_model: str
    host: Host
    adapter: str
    lora: dict
    optimizer: Any = None
    snapshots: deque = field(default_factory=deque)


@dataclass
class Sampler:
    sampler_id: str
    session_id: str
    base_model: str
    host: Host
    adapter: Optional[str]               # None: the base with every adapter off
    model_path: Optional[str] = None
    owned: bool = False                  # its adapter was made for it (deleted with it)
    clients: int = 0


@dataclass
class Session:
    session_id: str
    last_seen: float
    models: list = field(default_factory=list)
    samplers: list = field(default_factory=list)
    counter: int = 0                     # sampler snapshots made in it


class TinkerService:
    def __init__(self, home: Path, resolve_base: Callable[[str], Optional[Path]], offered: Callable[[], list[str]],
                 limits: Optional[Limits] = None, resolve_run: Callable[[str], Optional[Path]] = lambda name: None):
        self.home = Path(home)
        self.store = self.home / "tinker"
        self.resolve_base, self.offered, self.limits = resolve_base, offered, limits or Limits()
        self.resolve_run = resolve_run  # a finished LoRA run's final/ folder by its name: sampled, not trained
        self.lock = threading.RLock()
        self.sessions: dict[str, Session] = {}
        self.models: dict[str, TrainingModel] = {}
        self.samplers: dict[str, Sampler] = {}
        self.hosts: dict[str, Host] = {}
        self.futures: dict[str, Future] = {}
        self._adapter_counter = 0
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="tinker-sweeper", daemon=True)
        self._sweeper.start()

    # ------------------------------------------------------------------ sessions

    def create_session(self) -> str:
        sid = "ts-" + secrets.token_hex(8)
        with self.lock:
            self.sessions[sid] = Session(sid, time.monotonic())
        return sid

    def touch(self, session_id: str) -> Session:
        with self.lock:
            s = self.sessions.get(session_id)
            if s is None:
                raise UserError(f"no session {session_id!r} (it ended, or went idle for {self.limits.idle_seconds:g} s)", 404)
            s.last_seen = time.monotonic()
            return s

    def finish_session(self, session_id: str) -> None:
        with self.lock:
            s = self.sessions.pop(session_id, None)
        if s is None:
            return
        for mid in s.models:
            self._drop_model(mid)
        for sid in s.samplers:
            self._drop_sampler(sid)

    def _sweep_loop(self) -> None:
        while not self._stop.wait(min(5.0, self.limits.idle_seconds / 2)):
            self.sweep()

    def sweep(self) -> None:
        now = time.monotonic()
        with self.lock:
            busy = {f.session_id for f in self.futures.values() if not f.done.is_set()}  # work queued or running
            for sid in busy & set(self.sessions):
                self.sessions[sid].last_seen = now
            idle = [s.session_id for s in self.sessions.values() if now - s.last_seen > self.limits.idle_seconds]
            old = [f.id for f in self.futures.values()
                   if f.done.is_set() and now - f.finished > self.limits.futures_kept_seconds]
            for fid in old:
                self.futures.pop(fid, None)
        for sid in idle:
            log.info("tinker session %s idle for %.0f s: closed", sid, self.limits.idle_seconds)
            self.finish_session(sid)

    def stop(self) -> None:
        self._stop.set()
        for sid in list(self.sessions):
            self.finish_session(sid)
        with self.lock:
            hosts = list(self.hosts.values())
            self.hosts.clear()
        for h in hosts:
            h.jobs.put(None)

    # ------------------------------------------------------------------ futures and the worker

    def _submit(self, host: Host, work: Callable[[], Any], session_id: Optional[str] = None) -> Future:
        fut = Future("tf-" + secrets.token_hex(10), session_id=session_id)
        with self.lock:
            self.futures[fut.id] = fut
        host.jobs.put(lambda: _run_reporting(fut, work))
        return fut

    def future(self, request_id: str) -> Optional[Future]:
        with self.lock:
            fut = self.futures.get(request_id)
            if fut is not None and fut.session_id in self.sessions:
                self.sessions[fut.session_id].last_seen = time.monotonic()
            return fut

    @staticmethod
    def _worker(host: Host, pass_tokens: int = 2048) -> None:
        torch.set_grad_enabled(True)
        held = None
        while True:
            job = held if held is not None else host.jobs.get()
            held = None
            if job is None:
                return
            if not isinstance(job, SampleJob):
                try:
                    job()  # requests report their own errors; housekeeping (freeing adapters) only logs them
                except Exception:
                    log.exception("tinker housekeeping failed")
                continue
            batch = [job]  # the sample requests queued behind it join its engine batch (RL: a step's rollouts)
            while len(batch) < 256:
                try:
                    nxt = host.jobs.get_nowait()
                except queue.Empty:
                    break
                if isinstance(nxt, SampleJob):
                    batch.append(nxt)
                else:
                    held = nxt if nxt is not None else _STOP
                    break
            _run_samples(host, batch, pass_tokens)
            if held is _STOP:
                return

    # ------------------------------------------------------------------ base models

    def _host_for(self, base_model: str) -> Host:
        """The host of `base_model`, loaded now if need be (call on no host's worker: it may take a minute)."""
        model_dir = self.resolve_base(base_model)
        if model_dir is None:
            raise UserError(f"base model {base_model!r} is not offered here; offered: {', '.join(self.offered()) or 'none'}")
        return self._host_at(Path(model_dir))

    def _host_at(self, model_dir: Path) -> Host:
        key = str(Path(model_dir).resolve())
        with self.lock:
            if key in self.hosts:
                return self.hosts[key]
        from tunesmith.models.load import load_base_model, load_tokenizer, pick_device

        tokenizer = load_tokenizer(Path(model_dir))
        model = load_base_model(Path(model_dir), torch.float32, pick_device(), task="causal")
        model.config.use_cache = False
        with self.lock:
            if key in self.hosts:  # another request loaded it meanwhile
                return self.hosts[key]
            host = Host(key, Path(model_dir), tokenizer, model)
            host.thread = threading.Thread(target=self._worker, args=(host, self.limits.pass_tokens),
                                           name="tinker-worker", daemon=True)
            host.thread.start()
            self.hosts[key] = host
        return host

    def _free_host_if_empty(self, host: Host) -> None:
        with self.lock:
            in_use = host.adapters or any(s.host is host for s in self.samplers.values())
            if not in_use and self.hosts.get(host.key) is host:
                self.hosts.pop(host.key)
                host.jobs.put(None)

    def _new_adapter_name(self, prefix: str) -> str:
        with self.lock:
            self._adapter_counter += 1
            return f"{prefix}{self._adapter_counter}"

    def _check_capacity(self) -> None:
        with self.lock:
            used = sum(len(h.adapters) for h in self.hosts.values())
        if used >= self.limits.max_adapters:
            raise UserError(f"the studio holds {used} adapters already (its limit); close a session or save and free "
                            f"a training client first", 429)

    # ------------------------------------------------------------------ training clients

    def create_model(self, req: proto.CreateModelRequest) -> Future:
        self.touch(req.session_id)
        lora_cfg = req.lora_config or proto.LoraSettings(rank=32)
        if not (lora_cfg.train_attn or lora_cfg.train_mlp or lora_cfg.train_unembed):
            raise UserError("lora_config: at least one of train_attn, train_mlp, train_unembed must be true")
        model_id = f"{req.session_id}:train:{req.model_seq_id}"
        with self.lock:
            if model_id in self.models:
                raise UserError(f"model {model_id} exists already")
        self._check_capacity()
        host = self._host_for(req.base_model)
        self.touch(req.session_id)  # loading the base may have taken a while
        name = self._new_adapter_name("t")
        settings = lora_cfg.model_dump()

        def work() -> dict:
            _add_adapter(host, name, settings)
            with self.lock:
                self.models[model_id] = TrainingModel(model_id, req.session_id, req.base_model, host, name, settings)
                session = self.sessions.get(req.session_id)
                if session is None:  # closed while this waited
                    _delete_adapter(host, name)
                    raise UserError("the session ended before the model was made", 404)
                session.models.append(model_id)
            return {"model_id": model_id, "type": "create_model"}

        return self._submit(host, work, req.session_id)

    def training_model(self, model_id: str) -> TrainingModel:
        with self.lock:
            m = self.models.get(model_id)
        if m is None:
            raise UserError(f"no training client {model_id!r} (its session ended or went idle)", 404)
        self.touch(m.session_id)
        return m

    def get_info(self, model_id: str) -> dict:
        m = self.training_model(model_id)
        arch = (getattr(m.host.model.config, "architectures", None) or [type(m.host.model).__name__])[0]
        return {"type": "get_info", "model_id": model_id, "is_lora": True, "lora_rank": m.lora["rank"],
                "model_name": m.base_model,
                "model_data": {"arch": arch, "model_name": m.base_model, "tokenizer_id": m.base_model}}

    def unload_model(self, model_id: str) -> Future:
        m = self.training_model(model_id)

        def work() -> dict:
            self._drop_model(model_id)
            return {"model_id": model_id, "type": "unload_model"}

        return self._submit(m.host, work, m.session_id)

    def _drop_model(self, model_id: str) -> None:
        with self.lock:
            m = self.models.pop(model_id, None)
            if m is None:
                return
            s = self.sessions.get(m.session_id)
            if s and model_id in s.models:
                s.models.remove(model_id)

        def work() -> None:
            _delete_adapter(m.host, m.adapter)
            m.optimizer = None
            self._free_host_if_empty(m.host)

        m.host.jobs.put(work)

    def forward_backward(self, fb: proto.ForwardBackwardInput) -> Future:
        m = self.training_model(fb.model_id)
        if fb.loss_fn not in LOSSES:
            raise UserError(f"loss_fn {fb.loss_fn!r} is not supported here; supported: {', '.join(LOSSES)} "
                            f"(forward_backward_custom works: it runs on forward + cross_entropy)")
        if not fb.data:
            raise UserError("no data")
        vocab = m.host.model.get_input_embeddings().weight.shape[0]
        data = [_check_datum(i, d, fb.loss_fn, vocab) for i, d in enumerate(fb.data)]

        def work() -> bytes:
            if fb.model_id not in self.models:
                raise UserError("the training client was closed", 404)
            outputs, loss = _forward_backward(m.host, m.adapter, data, fb.loss_fn, fb.loss_fn_config,
                                              not fb.forward_only, self.limits.pass_tokens)
            return proto.write_forward_backward_output(outputs, {"loss:sum": loss})

        return self._submit(m.host, work, m.session_id)

    def optim_step(self, req: proto.OptimStepRequest) -> Future:
        m = self.training_model(req.model_id)
        if req.adam_params is None:
            kind = (req.optimizer_params or {}).get("type")
            raise UserError(f"optimizer {kind!r} is not supported here: send AdamParams")
        adam = req.adam_params

        def work() -> dict:
            if req.model_id not in self.models:
                raise UserError("the training client was closed", 404)
            return {"metrics": _optim_step(m, adam), "type": "optim_step"}

        return self._submit(m.host, work, m.session_id)

    # ------------------------------------------------------------------ saving and loading

    def _folder(self, run: str, kind: str, name: str) -> Path:
        return self.store / run.replace(":", "_") / kind / name

    def _parse_path(self, path: str) -> tuple[str, str, str, Path]:
        match = PATH_RE.match(path or "")
        if not match:
            raise UserError(f"path {path!r}: expected tinker://<training run>/weights/<name> or .../sampler_weights/<name>")
        run, kind, name = match.groups()
        folder = self._folder(run, kind, name)
        if not (folder / "tinker.json").is_file():
            raise UserError(f"no saved state {path!r}", 404)
        return run, kind, name, folder

    def save_weights(self, req: proto.SaveWeightsRequest, kind: str = "weights") -> Future:
        m = self.training_model(req.model_id)
        name = req.path or f"step-{int(time.time())}"
        if not NAME_RE.match(name):
            raise UserError(f"path {name!r}: a name of letters, digits, '.', '_' and '-' (at most 100)")
        folder = self._folder(m.model_id, kind, name)

        def work() -> dict:
            _save_adapter(m, folder, with_optimizer=kind == "weights")
            return {"path": f"tinker://{m.model_id}/{kind}/{name}", "type": "save_weights" if kind == "weights"
                    else "save_weights_for_sampler"}

        return self._submit(m.host, work, m.session_id)

    def save_weights_for_sampler(self, req: proto.SaveWeightsForSamplerRequest) -> Future:
        if req.path is not None:
            return self.save_weights(proto.SaveWeightsRequest(model_id=req.model_id, path=req.path), "sampler_weights")
        m = self.training_model(req.model_id)
        seq = req.sampling_session_seq_id if req.sampling_session_seq_id is not None else 0
        sampler_id = f"{m.session_id}:sample:{seq}"
        snap = self._new_adapter_name("s")

        def work() -> dict:
            if req.model_id not in self.models:
                raise UserError("the training client was closed", 404)
            _copy_adapter(m.host, m.adapter, snap, m.lora)
            with self.lock:
                self.samplers[sampler_id] = Sampler(sampler_id, m.session_id, m.base_model, m.host, snap, owned=True)
                session = self.sessions.get(m.session_id)
                if session is not None:
                    session.samplers.append(sampler_id)
                m.snapshots.append(sampler_id)
                dropped = [m.snapshots.popleft() for _ in range(max(0, len(m.snapshots) - SNAPSHOTS_KEPT))]
            for old in dropped:
                self._drop_sampler(old, now=True)
            return {"sampling_session_id": sampler_id, "type": "save_weights_for_sampler"}

        return self._submit(m.host, work, m.session_id)

    def load_weights(self, req: proto.LoadWeightsRequest) -> Future:
        _, _, _, folder = self._parse_path(req.path)
        meta = json.loads((folder / "tinker.json").read_text())
        if req.model_id:  # into an existing training client
            m = self.training_model(req.model_id)
            if Path(meta["model_dir"]).resolve() != m.host.model_dir.resolve():
                raise UserError(f"{req.path} was trained on {meta['base_model']!r}, this client on {m.base_model!r}")
            shape = lambda lora: {k: v for k, v in lora.items() if k != "seed"}  # noqa: E731
            if shape(meta["lora"]) != shape(m.lora):
                raise UserError(f"{req.path} has LoRA settings {shape(meta['lora'])}, this client {shape(m.lora)}")

            def work() -> dict:
                _load_adapter(m, folder, req.optimizer)
                return {"path": req.path, "model_id": m.model_id, "type": "load_weights"}

            return self._submit(m.host, work, m.session_id)
        if req.session_id is None or req.model_seq_id is None:
            raise UserError("load_weights: model_id, or session_id with model_seq_id")
        create = proto.CreateModelRequest(session_id=req.session_id, model_seq_id=req.model_seq_id,
                                          base_model=req.base_model or meta["base_model"],
                                          lora_config=proto.LoraSettings(**meta["lora"]))
        created = self.create_model(create)
        model_id = f"{req.session_id}:train:{req.model_seq_id}"
        host = self.models[model_id].host if model_id in self.models else self._host_for(create.base_model)

        def work() -> dict:
            if created.error:
                raise UserError(created.error)
            _load_adapter(self.models[model_id], folder, req.optimizer)
            return {"path": req.path, "model_id": model_id, "type": "load_weights"}

        return self._submit(host, work, req.session_id)  # after create_model's work on the same worker

    def weights_info(self, path: str) -> dict:
        _, _, _, folder = self._parse_path(path)
        meta = json.loads((folder / "tinker.json").read_text())
        lora = meta["lora"]
        return {"base_model": meta["base_model"], "is_lora": True, "lora_rank": lora["rank"],
                "train_unembed": lora["train_unembed"], "train_mlp": lora["train_mlp"], "train_attn": lora["train_attn"]}

    # ------------------------------------------------------------------ sampling

    def create_sampler(self, req: proto.CreateSamplingSessionRequest) -> str:
        self.touch(req.session_id)
        sampler_id = f"{req.session_id}:sample:{req.sampling_session_seq_id}"
        if req.model_path:
            _, _, _, folder = self._parse_path(req.model_path)
            meta = json.loads((folder / "tinker.json").read_text())
            self._check_capacity()
            host = self._host_for(meta["base_model"])
            name = self._new_adapter_name("p")
            done = self._submit(host, lambda: _add_adapter(host, name, meta["lora"], folder))
            done.done.wait()
            if done.error:
                raise UserError(done.error)
            sampler = Sampler(sampler_id, req.session_id, meta["base_model"], host, name, req.model_path, owned=True)
        elif req.base_model and (final := self.resolve_run(req.base_model)) is not None:
            sampler = self._run_sampler(sampler_id, req.session_id, req.base_model, final)
        elif req.base_model:
            sampler = Sampler(sampler_id, req.session_id, req.base_model, self._host_for(req.base_model), None)
        else:
            raise UserError("create_sampling_session: base_model or model_path")
        with self.lock:
            self.samplers[sampler_id] = sampler
            self.sessions[req.session_id].samplers.append(sampler_id)
        return sampler_id

    def _run_sampler(self, sampler_id: str, session_id: str, run: str, final: Path) -> Sampler:
        """A finished LoRA run (its adapter on its base, which the run names) as a sampler."""
        from peft import PeftConfig

        config = PeftConfig.from_pretrained(str(final))
        if getattr(config.peft_type, "value", config.peft_type) != "LORA":
            raise UserError(f"run {run!r} is a {config.peft_type} run: only LoRA runs can be sampled through this API")
        from tunesmith.models.load import resolve_model_dir

        self._check_capacity()
        host = self._host_at(resolve_model_dir(config.base_model_name_or_path))
        name = self._new_adapter_name("r")
        done = self._submit(host, lambda: _add_saved_adapter(host, name, final))
        done.done.wait()
        if done.error:
            raise UserError(done.error)
        return Sampler(sampler_id, session_id, run, host, name, owned=True)

    def sampler(self, sampler_id: str) -> Sampler:
        with self.lock:
            s = self.samplers.get(sampler_id)
        if s is None:
            raise UserError(f"no sampler {sampler_id!r} (its session ended, or a newer snapshot replaced it)", 404)
        self.touch(s.session_id)
        return s

    def join_sampler(self, sampler_id: str) -> int:
        s = self.sampler(sampler_id)
        with self.lock:
            s.clients += 1
            return s.clients

    def _drop_sampler(self, sampler_id: str, now: bool = False) -> None:
        with self.lock:
            s = self.samplers.pop(sampler_id, None)
            if s is None:
                return
            sess = self.sessions.get(s.session_id)
            if sess and sampler_id in sess.samplers:
                sess.samplers.remove(sampler_id)

        def work() -> None:
            if s.owned and s.adapter:
                _delete_adapter(s.host, s.adapter)
            self._free_host_if_empty(s.host)

        if now:
            work()
        else:
            s.host.jobs.put(work)

    def sample(self, req: proto.SampleRequest) -> tuple[Future, list[str]]:
        if req.sampling_session_id:
            s = self.sampler(req.sampling_session_id)
        else:
            raise UserError("sample: a sampling_session_id (make one with create_sampling_session)")
        try:
            prompt = proto.prompt_tokens(req.prompt)
        except ValueError as e:
            raise UserError(str(e)) from None
        if not prompt:
            raise UserError("prompt: no tokens")
        if req.num_samples > self.limits.max_samples:
            raise UserError(f"num_samples: at most {self.limits.max_samples}")
        vocab = s.host.model.get_input_embeddings().weight.shape[0]
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise UserError(f"prompt: token ids must be in 0 .. {vocab - 1}")
        params = req.sampling_params
        max_tokens = params.max_tokens or 16
        if max_tokens > self.limits.max_sample_tokens:
            raise UserError(f"sampling_params.max_tokens: at most {self.limits.max_sample_tokens}")
        if req.topk_prompt_logprobs or req.topk_sample_logprobs or req.prompt_alt_tokens_k or req.target_prompt_logprobs:
            raise UserError("top-k log-probs, target prompt log-probs and alternative tokens are not supported here")
        ids = [f"{s.sampler_id}:{req.seq_id or 0}:{i}" for i in range(req.num_samples)]

        def check() -> None:
            with self.lock:
                if s.sampler_id not in self.samplers:
                    raise UserError("the sampler was closed", 404)

        fut = Future("tf-" + secrets.token_hex(10), session_id=s.session_id)
        with self.lock:
            self.futures[fut.id] = fut
        s.host.jobs.put(SampleJob(fut, check, s.adapter, prompt, req.num_samples, params, max_tokens,
                                  bool(req.prompt_logprobs), req.prompt_logprobs_last_n))
        return fut, ids

    def status(self) -> dict:
        with self.lock:
            return {"sessions": len(self.sessions), "training_clients": len(self.models), "samplers": len(self.samplers),
                    "base_models_loaded": len(self.hosts), "adapters": sum(len(h.adapters) for h in self.hosts.values()),
                    "idle_seconds": self.limits.idle_seconds}

    # ------------------------------------------------------------------ a saved state as a studio run

    def export_run(self, path: str, name: Optional[str]) -> str:
        run, kind, ckpt, folder = self._parse_path(path)
        meta = json.loads((folder / "tinker.json").read_text())
        name = name or f"tinker-{ckpt}-{secrets.token_hex(3)}"
        if not NAME_RE.match(name):
            raise UserError(f"name {name!r}: letters, digits, '.', '_' and '-' (at most 100)")
        target = self.home / "runs" / name
        if target.exists():
            raise UserError(f"a run named {name!r} exists already", 409)
        _write_run(folder, meta, target, path)
        return name


# ---------------------------------------------------------------- adapters on the shared model


def _lora_config(model, settings: dict):
    """tunesmith's LoRA (methods.lora.apply's config) with Tinker's choice of layers."""
    from peft import LoraConfig

    from tunesmith.config import MethodConfig
    from tunesmith.methods import lora

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if settings["train_attn"] and settings["train_mlp"]:
        targets, _ = lora.adapted_modules(inner, MethodConfig(name="lora", r=settings["rank"]))
    else:
        targets = sorted({n.split(".")[-1] for n, m in inner.named_modules() if isinstance(m, torch.nn.Linear)
                          and ".layers." in f".{n}" and _is_attention(n) == settings["train_attn"]})
    if settings["train_unembed"] and not _tied(inner):
        head = inner.get_output_embeddings()
        head_name = next(n for n, m in inner.named_modules() if m is head)
        targets = ([targets] if isinstance(targets, str) else list(targets))
        if targets == ["all-linear"]:
            targets = sorted({n.split(".")[-1] for n, m in inner.named_modules() if isinstance(m, torch.nn.Linear)
                              and m is not head})
        targets = targets + [head_name]
    config = LoraConfig(r=settings["rank"], lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=targets,
                        task_type=lora.peft_task("causal"))
    config._register_custom_module({torch.nn.Linear: lora.MergedLoraLinear})
    return config


def _tied(model) -> bool:
    """The output head shares the input embeddings' weight: an adapter on it would, once merged for serving, change
    the embeddings too, so `train_unembed` is not applied to such models (SmolLM2 is one)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return bool(getattr(config, "tie_word_embeddings", False))


def _is_attention(module_name: str) -> bool:
    return any(part in module_name for part in ("attn", "attention"))


def _add_adapter(host: Host, name: str, settings: dict, folder: Optional[Path] = None) -> None:
    """A new adapter on the host's model (its first wraps the base with peft), seeded when asked; loaded from a saved
    adapter folder when given."""
    from peft import get_peft_model
    from peft.utils import set_peft_model_state_dict

    from tunesmith.methods import lora

    config = _lora_config(host.model, settings)
    if settings.get("seed") is not None:
        torch.manual_seed(settings["seed"])
    if hasattr(host.model, "peft_config"):
        host.model.add_adapter(name, config)
    else:
        host.model = get_peft_model(host.model, config, adapter_name=name)
    host.adapters.add(name)
    if folder is not None:
        from safetensors.torch import load_file

        set_peft_model_state_dict(host.model, load_file(folder / "adapter_model.safetensors"), adapter_name=name)
        lora.weights_changed()


def _add_saved_adapter(host: Host, name: str, folder: Path) -> None:
    """A LoRA adapter saved by peft (a tunesmith run's final/) added to the host's model as it was trained."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from tunesmith.methods import lora

    config = LoraConfig.from_pretrained(str(folder))
    config.inference_mode = True
    if hasattr(host.model, "peft_config"):
        host.model.add_adapter(name, config)
    else:
        host.model = get_peft_model(host.model, config, adapter_name=name)
    host.adapters.add(name)
    set_peft_model_state_dict(host.model, load_file(folder / "adapter_model.safetensors"), adapter_name=name)
    lora.weights_changed()


def _delete_adapter(host: Host, name: str) -> None:
    if name in host.adapters:
        host.adapters.discard(name)
        host.model.delete_adapter(name)


def _copy_adapter(host: Host, source: str, name: str, settings: dict) -> None:
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(host.model, adapter_name=source).items()}
    _add_adapter(host, name, {**settings, "seed": None})
    set_peft_model_state_dict(host.model, state, adapter_name=name)


def _trainable(m: TrainingModel) -> list[tuple[str, torch.nn.Parameter]]:
    marker = f".{m.adapter}."
    return sorted((n, p) for n, p in m.host.model.named_parameters() if marker in n)


def _activate(host: Host, adapter: Optional[str]) -> None:
    """Make `adapter` the one the model computes with, and the only one whose weights get gradients."""
    if adapter is not None:
        host.model.set_adapter(adapter)
        for n, p in host.model.named_parameters():
            p.requires_grad_(f".{adapter}." in n)


# ---------------------------------------------------------------- forward / backward


def _check_datum(i: int, d: proto.Datum, loss_fn: str, vocab: int) -> tuple[list[int], dict[str, torch.Tensor]]:
    n = len(d.tokens)
    if n == 0:
        raise UserError(f"data[{i}].model_input: no tokens")
    if min(d.tokens) < 0 or max(d.tokens) >= vocab:
        raise UserError(f"data[{i}].model_input: token ids must be in 0 .. {vocab - 1}")
    needed = {"cross_entropy": ("target_tokens",),
              "importance_sampling": ("target_tokens", "logprobs", "advantages"),
              "ppo": ("target_tokens", "logprobs", "advantages"),
              "cispo": ("target_tokens", "logprobs", "advantages")}[loss_fn]
    out = {}
    for key in needed:
        if key not in d.inputs:
            raise UserError(f"data[{i}].loss_fn_inputs: {loss_fn} needs {', '.join(needed)}; {key!r} is missing")
    for key, arr in d.inputs.items():
        if key not in ("target_tokens", "weights", "logprobs", "advantages"):
            continue
        if arr.ndim != 1 or arr.shape[0] != n:
            raise UserError(f"data[{i}].loss_fn_inputs.{key}: shape {list(arr.shape)}, expected [{n}] (one value per "
                            f"input token)")
        out[key] = torch.from_numpy(np.ascontiguousarray(arr)).to(torch.long if key == "target_tokens" else torch.float32)
    targets = out["target_tokens"]
    if int(targets.min()) < 0 or int(targets.max()) >= vocab:
        raise UserError(f"data[{i}].loss_fn_inputs.target_tokens: ids must be in 0 .. {vocab - 1}")
    if "weights" not in out:
        out["weights"] = torch.ones(n)
    return list(d.tokens), out


def _clip_range(config: dict) -> tuple[float, float]:
    low, high = float(config.get("clip_low_threshold", 0.8)), float(config.get("clip_high_threshold", 1.2))
    if not 0 <= low <= high:
        raise UserError("loss_fn_config: clip_low_threshold <= clip_high_threshold, both >= 0")
    return low, high


def _loss_cross_entropy(lp, inp, config):
    return -(lp * inp["weights"]).sum()


def _loss_importance_sampling(lp, inp, config):
    return -(torch.exp(lp - inp["logprobs"]) * inp["advantages"]).sum()


def _loss_ppo(lp, inp, config):
    low, high = _clip_range(config)
    ratio = torch.exp(lp - inp["logprobs"])
    a = inp["advantages"]
    return -torch.min(ratio * a, torch.clamp(ratio, low, high) * a).sum()


def _loss_cispo(lp, inp, config):
    low, high = _clip_range(config)
    ratio = torch.exp(lp - inp["logprobs"]).detach()
    return -(torch.clamp(ratio, low, high) * lp * inp["advantages"]).sum()


LOSSES = {"cross_entropy": _loss_cross_entropy, "importance_sampling": _loss_importance_sampling,
          "ppo": _loss_ppo, "cispo": _loss_cispo}


def token_logprobs(model, rows: list[list[int]], targets: list[torch.Tensor], pad_id: int,
                   starts: Optional[list[int]] = None) -> list[torch.Tensor]:
    """log p(target_t | row[:t+1]) for the positions t >= starts[i] (default 0) of every row, through the backbone +
    output head split that training uses (models.heads.hidden_and_head: rows sharing a prefix compute it once), or
    the model's own logits when the head is adapted. Rows are right-padded and run without an attention mask: with
    causal attention no real token sees a pad to its right."""
    from tunesmith.models.heads import hidden_and_head

    width = max(len(r) for r in rows)
    device = next(model.parameters()).device
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    ids = ids.to(device)
    parts = hidden_and_head(model, ids)
    logits_all = None if parts is not None else model(input_ids=ids, use_cache=False).logits
    out = []
    for i, (r, t) in enumerate(zip(rows, targets)):
        start, n = (starts[i] if starts else 0), len(r)
        logits = parts[0][i, start:n] @ parts[1].T if parts is not None else logits_all[i, start:n]
        lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, t[start:n].to(device)[:, None]).squeeze(-1)
        out.append(lp)
    return out


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    return next((i for i in range(n) if a[i] != b[i]), n)


def _passes(rows: list[list[int]], budget: int, min_shared: int = 16) -> list[list[int]]:
    """Row indices in passes of at most `budget` padded tokens (a longer row gets its own pass). A pass whose rows
    share a prefix of `min_shared`+ tokens (one prompt's samples) ends where that sharing would end, so the prefix
    is computed once for it (hidden_and_head)."""
    passes, current, width, shared = [], [], 0, 0
    for i, row in enumerate(rows):
        if current:
            s = _common_prefix(rows[current[0]], row, shared)
            if max(width, len(row)) * (len(current) + 1) > budget or (len(current) > 1 and shared >= min_shared > s):
                passes.append(current)
                current, width = [], 0
            else:
                shared = s
        if not current:
            shared = len(row)
        current.append(i)
        width = max(width, len(row))
    if current:
        passes.append(current)
    return passes


def _forward_backward(host: Host, adapter: str, data, loss_fn: str, config: dict, backward: bool,
                      pass_tokens: int) -> tuple[list[dict], float]:
    model = host.model
    _activate(host, adapter)
    model.train()
    pad = host.tokenizer.pad_token_id if host.tokenizer.pad_token_id is not None else 0
    loss_of = LOSSES[loss_fn]
    outputs: list[Optional[dict]] = [None] * len(data)
    total = 0.0
    for indices in _passes([d[0] for d in data], pass_tokens):
        with torch.set_grad_enabled(backward):
            lps = token_logprobs(model, [data[i][0] for i in indices], [data[i][1]["target_tokens"] for i in indices], pad)
            loss = sum(loss_of(lp, {k: v.to(lp.device) for k, v in data[i][1].items()}, config)
                       for i, lp in zip(indices, lps))
        if backward:
            loss.backward()
        total += float(loss.detach())
        for i, lp in zip(indices, lps):
            outputs[i] = {"logprobs": lp.detach().float().cpu().numpy()}
    if not math.isfinite(total):
        raise UserError(f"the loss is not finite ({total}); check the inputs (log-probs, advantages, weights)")
    return outputs, total


def _optim_step(m: TrainingModel, adam: proto.AdamSettings) -> dict:
    from tunesmith.methods import lora
    from tunesmith.train.schedule import adamw

    params = [p for _, p in _trainable(m)]
    if m.optimizer is None:
        m.optimizer = adamw(params, adam.learning_rate, adam.weight_decay)  # torch's fused AdamW, as training builds it
    for group in m.optimizer.param_groups:
        group.update(lr=adam.learning_rate, betas=(adam.beta1, adam.beta2), eps=adam.eps,
                     weight_decay=adam.weight_decay)
    with_grad = [p for p in params if p.grad is not None]
    norm = float(torch.nn.utils.clip_grad_norm_(with_grad, adam.grad_clip_norm if adam.grad_clip_norm > 0 else math.inf)
                 ) if with_grad else 0.0
    if not math.isfinite(norm):
        m.optimizer.zero_grad(set_to_none=True)
        raise UserError("the gradient is not finite: the step was not taken (the gradients were dropped)")
    m.optimizer.step()
    m.optimizer.zero_grad(set_to_none=True)
    lora.weights_changed()  # the fused step updates in place: kept merged LoRA weights must be rebuilt
    return {"grad_norm:mean": norm}


# ---------------------------------------------------------------- save / load


def _save_adapter(m: TrainingModel, folder: Path, with_optimizer: bool) -> None:
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from tunesmith.run.files import publish_dir

    host = m.host
    folder.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in
             get_peft_model_state_dict(host.model, adapter_name=m.adapter).items()}

    def write(tmp: Path) -> None:
        save_file(state, tmp / "adapter_model.safetensors")
        config = host.model.peft_config[m.adapter]
        config.base_model_name_or_path = str(host.model_dir)
        config.save_pretrained(tmp)
        if with_optimizer and m.optimizer is not None:
            torch.save(m.optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "tinker.json").write_text(json.dumps({"base_model": m.base_model, "model_dir": str(host.model_dir),
                                                     "lora": m.lora, "model_id": m.model_id}))

    publish_dir(folder, write)


def _load_adapter(m: TrainingModel, folder: Path, with_optimizer: bool) -> None:
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from tunesmith.methods import lora
    from tunesmith.train.schedule import adamw

    set_peft_model_state_dict(m.host.model, load_file(folder / "adapter_model.safetensors"), adapter_name=m.adapter)
    lora.weights_changed()
    m.optimizer = None
    if with_optimizer:
        if not (folder / "optimizer.pt").is_file():
            raise UserError("this state was saved without an optimizer (no optim_step had run, or it is sampler weights)")
        params = [p for _, p in _trainable(m)]
        m.optimizer = adamw(params, 1e-4, 0.0)
        m.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))


def _write_run(folder: Path, meta: dict, target: Path, path: str) -> None:
    """A studio run folder from a saved state: config.yaml (a LoRA run of the base), final/ (the adapter and the
    base's tokenizer), the run marker; published at once."""
    import shutil

    import yaml

    from tunesmith.models.load import load_tokenizer
    from tunesmith.run.files import publish_dir
    from tunesmith.run.layout import RUN_MARKER

    target.parent.mkdir(parents=True, exist_ok=True)
    settings = meta["lora"]

    def write(tmp: Path) -> None:
        final = tmp / "final"
        final.mkdir()
        for f in ("adapter_model.safetensors", "adapter_config.json"):
            shutil.copy2(folder / f, final / f)
        load_tokenizer(Path(meta["model_dir"])).save_pretrained(final)
        config = {"model": {"name": meta["base_model"]},
                  "method": {"name": "lora", "r": settings["rank"], "alpha": LORA_ALPHA},
                  "output": {"name": target.name}}
        (tmp / "config.yaml").write_text(f"# made from the Tinker API state {path}\n" + yaml.safe_dump(config))
        (tmp / RUN_MARKER).write_text("")

    publish_dir(target, write)


# ---------------------------------------------------------------- sampling


_STOP = object()


def _run_samples(host: Host, jobs: list[SampleJob], pass_tokens: int) -> None:
    """Sample requests in one engine batch (each request seeded on its own, so a result does not depend on the
    batch), then the log-probs of every sequence (and of the prompts asked for) in scoring passes per adapter."""
    from tunesmith.models.engine import BASE, Engine, Request
    from tunesmith.models.sampling import Sampling

    live = []
    for job in jobs:
        try:
            job.check()
            live.append(job)
        except UserError as e:
            job.fut.finish(error=str(e), category="user")
    if not live:
        return
    try:
        model = host.model
        peft = hasattr(model, "peft_config")
        if host.engine is None or host.engine_for != id(model):
            host.engine, host.engine_for = Engine(model, host.tokenizer, max_rows=64), id(model)
        model.eval()
        per_job = []
        for job in live:
            p = job.params
            stop = p.stop if isinstance(p.stop, list) else ([p.stop] if p.stop else [])
            seed = p.seed if p.seed is not None else secrets.randbelow(2 ** 31)
            greedy = p.temperature < 1e-5
            requests = [Request(prompt_ids=list(job.prompt), stop=[x for x in stop if isinstance(x, str)],
                                adapter=job.adapter if job.adapter is not None else (BASE if peft else None),
                                sampling=Sampling(max_new_tokens=job.max_tokens, do_sample=not greedy,
                                                  temperature=max(p.temperature, 1e-5),
                                                  top_k=p.top_k if p.top_k > 0 else 0, top_p=p.top_p, seed=seed + i))
                        for i in range(job.n)]
            per_job.append((job, requests, {x for x in stop if isinstance(x, int)}))
        with torch.no_grad():
            host.engine.run([r for _, requests, _ in per_job for r in requests])
        scored: dict = {}  # adapter -> list of (job index, row)
        results = []
        for j, (job, requests, stop_tokens) in enumerate(per_job):
            failed = next((r.error for r in requests if r.error), None)
            if failed:
                raise RuntimeError(f"generation failed: {failed}")
            sequences = []
            for r in requests:
                tokens, reason = list(r.output_ids), ("stop" if r.finish_reason == "stop" else "length")
                cut = next((k for k, t in enumerate(tokens) if t in stop_tokens), None)
                if cut is not None:
                    tokens, reason = tokens[:cut + 1], "stop"
                sequences.append(proto.Sequence(tokens, [], reason))
                scored.setdefault(job.adapter, []).append((j, len(sequences) - 1, job.prompt + tokens))
            results.append(sequences)
        logprobs = {}
        pad = host.tokenizer.pad_token_id if host.tokenizer.pad_token_id is not None else 0
        for adapter, rows in scored.items():
            with torch.no_grad(), _weights(host, adapter):
                for indices in _passes([r[2] for r in rows], pass_tokens):
                    chunk = [rows[i] for i in indices]
                    inputs = [r[2][:-1] if len(r[2]) > 1 else r[2] for r in chunk]
                    targets = [torch.tensor(r[2][1:] if len(r[2]) > 1 else r[2], dtype=torch.long) for r in chunk]
                    # the head runs on the completion only, and on the prompt too where its log-probs were asked for
                    starts = [0 if (live[r[0]].prompt_logprobs and r[1] == 0) else max(0, len(live[r[0]].prompt) - 1)
                              for r in chunk]
                    for r, st, lp in zip(chunk, starts, token_logprobs(host.model, inputs, targets, pad, starts)):
                        logprobs[(r[0], r[1])] = torch.cat([torch.full((st,), math.nan), lp.float().cpu()])
    except Exception:
        ref = secrets.token_hex(6)
        log.exception("tinker sampling failed (reference %s)", ref)
        for job in live:
            job.fut.finish(error=f"internal error (reference {ref})", category="server")
        return
    for j, (job, _, _) in enumerate(per_job):
        p = len(job.prompt)
        for k, seq in enumerate(results[j]):
            seq.logprobs = logprobs[(j, k)][p - 1:p - 1 + len(seq.tokens)].tolist() if seq.tokens else []
        prompt_lp = None
        if job.prompt_logprobs:
            prompt_lp = [math.nan] + logprobs[(j, 0)][:p - 1].tolist()
            if job.last_n is not None:
                prompt_lp = [math.nan] * (p - job.last_n) + prompt_lp[p - job.last_n:]
        job.fut.finish(proto.write_sample_response(results[j], prompt_lp))


class _weights:
    """Compute with a sampler's weights: its adapter, or the base with every adapter off."""

    def __init__(self, host: Host, adapter: Optional[str]):
        self.host, self.adapter, self.ctx = host, adapter, None

    def __enter__(self):
        if self.adapter is not None:
            _activate(self.host, self.adapter)
        elif hasattr(self.host.model, "disable_adapter"):
            self.ctx = self.host.model.disable_adapter()
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)
