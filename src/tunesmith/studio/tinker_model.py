"""The Tinker API's model side (tinker_service.py keeps the sessions, futures' bookkeeping and names): one base model
in memory per `Host` with its worker thread, each training client a LoRA adapter on it, and the work that runs on that
thread -- adapters added, copied and deleted; forward/backward with Tinker's losses on tunesmith's model code; the
optimizer step; adapters and optimizer state saved and loaded; samples through the generation engine. The module
docstring of tinker_service.py says how the pieces behave together.
"""
from __future__ import annotations

import json
import logging
import math
import queue
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


class UserError(Exception):
    """The request is wrong: answered 400 (or `status`) with this message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


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


def run_reporting(fut: Future, work: Callable[[], Any]) -> None:
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


def add_adapter(host: Host, name: str, settings: dict, folder: Optional[Path] = None) -> None:
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


def add_saved_adapter(host: Host, name: str, folder: Path) -> None:
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


def delete_adapter(host: Host, name: str) -> None:
    if name in host.adapters:
        host.adapters.discard(name)
        host.model.delete_adapter(name)


def copy_adapter(host: Host, source: str, name: str, settings: dict) -> None:
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(host.model, adapter_name=source).items()}
    add_adapter(host, name, {**settings, "seed": None})
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


def check_datum(i: int, d: proto.Datum, loss_fn: str, vocab: int) -> tuple[list[int], dict[str, torch.Tensor]]:
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


def forward_backward(host: Host, adapter: str, data, loss_fn: str, config: dict, backward: bool,
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


def optim_step(m: TrainingModel, adam: proto.AdamSettings) -> dict:
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


def save_adapter(m: TrainingModel, folder: Path, with_optimizer: bool) -> None:
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


def load_adapter(m: TrainingModel, folder: Path, with_optimizer: bool) -> None:
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


def write_run(folder: Path, meta: dict, target: Path, path: str) -> None:
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


STOP = object()


def run_samples(host: Host, jobs: list[SampleJob], pass_tokens: int) -> None:
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
