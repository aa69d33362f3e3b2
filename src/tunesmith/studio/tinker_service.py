"""What the studio does for the Tinker training API (tinker_routes.py is its HTTP side): training clients as LoRA
adapters on one shared base model, their primitives run on tunesmith's own model code, and futures for the SDK to
poll. This module keeps sessions, clients, samplers, names and futures; the work on the model (adapters, losses,
forward/backward, the step, save/load, sampling) is tinker_model.py's.

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
import queue
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from tunesmith.studio import tinker_model as tm
from tunesmith.studio import tinker_protocol as proto
from tunesmith.studio.tinker_model import LOSSES, Future, Host, SampleJob, TrainingModel, UserError

log = logging.getLogger("tunesmith.studio.tinker")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
PATH_RE = re.compile(r"^tinker://([A-Za-z0-9:_-]{1,120})/(weights|sampler_weights)/([A-Za-z0-9][A-Za-z0-9._-]{0,99})$")
SNAPSHOTS_KEPT = 4  # a training client's unnamed sampler snapshots kept in memory (RL makes one per step)


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
        host.jobs.put(lambda: tm.run_reporting(fut, work))
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
                    held = nxt if nxt is not None else tm.STOP
                    break
            tm.run_samples(host, batch, pass_tokens)
            if held is tm.STOP:
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
            tm.add_adapter(host, name, settings)
            with self.lock:
                self.models[model_id] = TrainingModel(model_id, req.session_id, req.base_model, host, name, settings)
                session = self.sessions.get(req.session_id)
                if session is None:  # closed while this waited
                    tm.delete_adapter(host, name)
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
            tm.delete_adapter(m.host, m.adapter)
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
        data = [tm.check_datum(i, d, fb.loss_fn, vocab) for i, d in enumerate(fb.data)]

        def work() -> bytes:
            if fb.model_id not in self.models:
                raise UserError("the training client was closed", 404)
            outputs, loss = tm.forward_backward(m.host, m.adapter, data, fb.loss_fn, fb.loss_fn_config,
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
            return {"metrics": tm.optim_step(m, adam), "type": "optim_step"}

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
            tm.save_adapter(m, folder, with_optimizer=kind == "weights")
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
            tm.copy_adapter(m.host, m.adapter, snap, m.lora)
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
                tm.load_adapter(m, folder, req.optimizer)
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
            tm.load_adapter(self.models[model_id], folder, req.optimizer)
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
            done = self._submit(host, lambda: tm.add_adapter(host, name, meta["lora"], folder))
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
        done = self._submit(host, lambda: tm.add_saved_adapter(host, name, final))
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
                tm.delete_adapter(s.host, s.adapter)
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
        tm.write_run(folder, meta, target, path)
        return name
