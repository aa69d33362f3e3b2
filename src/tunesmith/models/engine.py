"""One generation engine for evaluation, the run's samples, sequence distillation, chat, serving and RL rollouts:
continuous batching over a KV cache of our own, with the model's own forward.

What it wins over `model.generate` on padded batches (measured in bench/generate.py, docs/performance.md):
  * requests join and leave the running batch: a finished row leaves at once (padded generate keeps computing it
    until the longest row ends), and a new request joins without waiting for the batch to drain;
  * a prompt is prefilled once into its slot, in chunks (`prefill_chunk` tokens per engine step), between decode
    steps of the running rows, so streams keep flowing while a long prompt is read;
  * a prompt prefix that an active row already holds (the n completions of one RL prompt, one system prompt in front
    of many requests) is copied, not computed again;
  * decode steps carry no padding: each row attends to its own length (a boolean mask), and its KV cache grows in
    place (no concatenation per step, as DynamicCache does);
  * rows of different LoRA adapters run in one batch (peft's mixed-adapter forward), so several runs on one base are
    served together; a merged model or a plain base works the same way.

What it keeps from the libraries: the model's forward itself (transformers: its layers, rotary embeddings, attention
through SDPA; peft: the adapters), which is handed a `SlotCache` (slot_cache.py: a transformers Cache whose layers
write each row's keys and values at that row's own position) and a 4D mask. Tokens are picked as transformers' logits
processors pick them (sampling.py), so greedy decoding is token-identical to `model.generate` (tests/test_engine.py);
each request samples from a generator of its own, seeded, so its output does not depend on what else was in the
batch.

Not here: beam search and prompt/prefix tuning (virtual tokens in front of every sequence) -- models.generate keeps
`model.generate` for those.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
from tunesmith.errors import TunesmithError
from tunesmith.models.sampling import Sampling, first_stop, pick_tokens, stop_prefix_tail
from tunesmith.models.slot_cache import SlotCache


BASE = "__base__"  # Request.adapter for the base model with every adapter off (peft's name for it)


class EngineFull(Exception):
    """The waiting queue is full: the caller should come back later (a server answers 429 with Retry-After)."""


@dataclass
class Request:
    prompt_ids: list[int]
    sampling: Sampling = field(default_factory=Sampling)
    stop: list[str] = field(default_factory=list)
    adapter: str | None = None                    # a peft adapter of the model by name; None: as the model is
    on_text: Callable[[str], None] | None = None  # streaming: called (engine thread) with each new piece of text
    on_done: Callable[["Request"], None] | None = None
    # results
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None              # "stop" (EOS or a stop string), "length", "cancelled", "error"
    error: str | None = None
    submitted: float = 0.0
    first_token: float | None = None
    finished_at: float | None = None
    # engine state
    cancelled: bool = False
    _sent: int = 0                                # characters of `text` given to on_text
    _generator: torch.Generator | None = None
    _done: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop generating (a client that hung up): the row leaves the batch at the next step."""
        self.cancelled = True

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def done(self) -> bool:
        return self._done.is_set()


@dataclass
class _Row:
    req: Request
    slot: int
    length: int = 0              # tokens in the slot's cache
    prefilled: int = 0           # prompt tokens in the cache so far
    next_token: int | None = None  # sampled, not yet fed
    seen: torch.Tensor | None = None  # prompt + output ids (repetition penalty, no-repeat n-grams)
    prompt_logits: torch.Tensor | None = None  # at the prompt's last position: a request with the same prompt reuses them


def supports(model) -> str | None:
    """None when the engine can run `model`, else why not (models.generate then runs model.generate)."""
    peft_config = getattr(model, "peft_config", None)
    if peft_config and any(c.is_prompt_learning for c in peft_config.values()):
        return "prompt/prefix tuning puts virtual tokens in front of every sequence"
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(inner.config, "is_decoder", True) or not hasattr(inner, "generation_config"):
        return "not a causal language model"
    if getattr(inner.config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return f"attention implementation {inner.config._attn_implementation}"
    return None


class Engine:
    """Continuous batching over one model (see the module docstring). Thread-safe `submit`; `step` runs one
    scheduling round (prefill, then one decode step for every running row); `start` runs rounds in a thread of its
    own (a server), `run` in the caller's (evaluation, RL rollouts)."""

    def __init__(self, model, tokenizer, max_rows: int = 32, prefill_chunk: int = 1024, max_waiting: int = 1024,
                 min_shared_prefix: int = 16):
        if why := supports(model):
            raise TunesmithError(f"the generation engine cannot run this model: {why}")
        self.model, self.tokenizer = model.eval(), tokenizer
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.config = inner.config.get_text_config() if hasattr(inner.config, "get_text_config") else inner.config
        self.device = next(model.parameters()).device
        self.eos = set(eos_ids(tokenizer, model))
        self.max_rows, self.prefill_chunk, self.max_waiting = max_rows, prefill_chunk, max_waiting
        self.min_shared_prefix = min_shared_prefix
        self.peft = hasattr(model, "peft_config")
        self.mixed_adapters = self.peft and all(getattr(c, "peft_type", None) is not None and c.peft_type.value == "LORA"
                                                for c in model.peft_config.values())
        self.sliding = _sliding_window(self.config)
        self.cache = SlotCache(self.config.num_hidden_layers, 4, 256)
        self.rows: list[_Row] = []          # slots 0 .. len-1, in order
        self.waiting: deque[Request] = deque()
        self.lock = threading.Condition()
        self.heartbeat = time.monotonic()
        self.generated_tokens = 0
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- submitting -------------------------------------------------------------------------------------------------
    def submit(self, req: Request) -> Request:
        if not req.prompt_ids:
            raise TunesmithError("an empty prompt: there is nothing to continue")
        if req.adapter is not None and not (self.peft and (req.adapter in self.model.peft_config or req.adapter == BASE)):
            raise TunesmithError(f"no adapter named {req.adapter!r} on this model")
        req.submitted = time.monotonic()
        req._generator = torch.Generator(device="cpu").manual_seed(req.sampling.seed)
        with self.lock:
            if len(self.waiting) >= self.max_waiting:
                raise EngineFull(f"{len(self.waiting)} requests are waiting already")
            self.waiting.append(req)
            self.lock.notify_all()
        return req

    def pending(self) -> int:
        with self.lock:
            return len(self.waiting) + len(self.rows)

    # -- running ----------------------------------------------------------------------------------------------------
    def run(self, requests: list[Request]) -> list[Request]:
        """Submit `requests` and run rounds in this thread until they are all done (batch use: eval, RL)."""
        for r in requests:
            with self.lock:  # batch use may queue beyond the server's admission limit
                r.submitted = time.monotonic()
                r._generator = torch.Generator(device="cpu").manual_seed(r.sampling.seed)
                self.waiting.append(r)
        while not all(r.done for r in requests):
            self.step()
        return requests

    def start(self) -> None:
        """Rounds in a thread of its own while there is work (a server)."""
        def loop():
            while not self._stopping:
                with self.lock:
                    while not self.waiting and not self.rows and not self._stopping:
                        self.heartbeat = time.monotonic()
                        self.lock.wait(timeout=1.0)
                if not self._stopping:
                    self.step()
        self._thread = threading.Thread(target=loop, name="tunesmith-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        with self.lock:
            self.lock.notify_all()
        if self._thread:
            self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        """The worker thread runs and has gone round within the last minute (a server's /health)."""
        return self._thread is not None and self._thread.is_alive() and time.monotonic() - self.heartbeat < 60

    @torch.no_grad()
    def step(self) -> None:
        """One round: drop cancelled rows; prefill waiting prompts into free slots (up to `prefill_chunk` tokens);
        one decode step for every row whose prompt is in; hand out text; retire finished rows."""
        self.heartbeat = time.monotonic()
        try:
            self._retire([r for r in self.rows if r.req.cancelled], "cancelled")
            self._admit_and_prefill()
            # the rows whose prompt is in: slots 0 .. n-1 (only the newest row can still be reading its prompt)
            n = sum(1 for r in self.rows if r.prefilled == len(r.req.prompt_ids))
            if n:
                self._decode(self.rows[:n])
        except Exception as e:  # the rows in flight fail, the engine lives on
            failed = list(self.rows)
            self._fail(failed, f"{type(e).__name__}: {e}")
            if not failed:
                raise

    def _admit_and_prefill(self) -> None:
        """Up to `prefill_chunk` prompt tokens into the cache in one forward: the newest row's unfinished prompt
        first, then waiting requests while slots are free, their prompts packed side by side. A request whose prompt
        shares its beginning with a prompt in this very forward waits for the next round, to copy it."""
        budget, segments = self.prefill_chunk, []
        row = next((r for r in self.rows if r.prefilled < len(r.req.prompt_ids)), None)
        if row is not None:
            segments.append((row, min(budget, len(row.req.prompt_ids) - row.prefilled)))
            budget -= segments[-1][1]
        while budget > 0 and (not segments or segments[-1][0].prefilled + segments[-1][1] == len(segments[-1][0].req.prompt_ids)):
            with self.lock:
                req = self._next_admissible(pending=[r.req for r, _ in segments], min_shared=self.min_shared_prefix)
            if req is None:
                break
            row = self._place(req)
            if row is None or row.prefilled == len(req.prompt_ids):  # refused, or its whole prompt copied
                continue
            segments.append((row, min(budget, len(req.prompt_ids) - row.prefilled)))
            budget -= segments[-1][1]
        if segments:
            self._prefill(segments)

    def _next_admissible(self, pending: list[Request] = (), min_shared: int = 0) -> Request | None:
        """The next waiting request that may join now (a free slot; without mixed adapters, the running rows' adapter;
        not one whose prompt begins like a prompt in `pending`, still being computed)."""
        while self.waiting and self.waiting[0].cancelled:
            self._finish_waiting(self.waiting.popleft(), "cancelled")
        if not self.waiting or len(self.rows) >= self.max_rows:
            return None
        head = self.waiting[0]
        if any(_common_prefix(head.prompt_ids, p.prompt_ids, min(len(head.prompt_ids), len(p.prompt_ids))) >= max(1, min_shared)
               and p.adapter == head.adapter for p in pending):
            return None
        if self.mixed_adapters or not self.rows:
            return self.waiting.popleft()
        adapter = self.rows[0].req.adapter
        for i, req in enumerate(self.waiting):
            if req.adapter == adapter:
                del self.waiting[i]
                return req
        return None

    def _place(self, req: Request) -> _Row | None:
        slot = len(self.rows)
        total = len(req.prompt_ids) + req.sampling.max_new_tokens
        limit = getattr(self.config, "max_position_embeddings", None)
        if limit and total > limit:
            self._finish_waiting(req, "error", f"the prompt ({len(req.prompt_ids)} tokens) and max_new_tokens "
                                               f"({req.sampling.max_new_tokens}) exceed the model's context of {limit}")
            return None
        self.cache.ensure(total, slot + 1)
        row = _Row(req, slot, seen=torch.tensor(req.prompt_ids, dtype=torch.long))
        shared = self._shared_prefix(req)
        self.rows.append(row)
        if shared:  # copy what an active row already computed for the same leading tokens
            src, n = shared
            self.cache.move(src.slot, slot, n)
            row.length = row.prefilled = n
            if n == len(req.prompt_ids):  # the same whole prompt: its last logits too, no forward at all
                row.prompt_logits = src.prompt_logits
                self._choose([row], src.prompt_logits[None].clone())
                self._emit([row])
        return row

    def _shared_prefix(self, req: Request) -> tuple[_Row, int] | None:
        """The active row holding the longest run of `req`'s leading tokens (under the same adapter: another adapter
        computes other keys and values for the same tokens), and how many."""
        ids, best, best_n = req.prompt_ids, None, 0
        for r in self.rows:
            other = r.req.prompt_ids
            # at least one token of the new prompt runs (for its logits), unless the row kept its prompt's logits
            whole = r.prompt_logits is not None and len(other) == len(ids)
            n = min(r.prefilled, len(ids) if whole else len(ids) - 1, len(other))
            if n <= best_n or n < self.min_shared_prefix or r.req.adapter != req.adapter:
                continue
            k = _common_prefix(ids, other, n)
            if k > best_n:
                best, best_n = r, k
        return (best, best_n) if best is not None and best_n >= self.min_shared_prefix else None

    def _prefill(self, segments: list[tuple[_Row, int]]) -> None:
        """One forward over the next `n` prompt tokens of each (row, n), packed into one sequence: each segment sees its
        own slot's cache and itself, causally (a block mask); logits at each segment's last token."""
        plan, tokens, positions, blocks = [], [], [], []
        kv_offset = 0
        for row, n in segments:
            start = row.prefilled
            tokens += row.req.prompt_ids[start:start + n]
            positions.append(torch.arange(start, start + n))
            plan.append((row.slot, start, n))
            blocks.append((kv_offset, start, n))
            kv_offset += start + n
        q_total = len(tokens)
        allowed = torch.zeros(q_total, kv_offset, dtype=torch.bool)
        q = 0
        for base, start, n in blocks:
            keys = torch.arange(start + n)
            allowed[q:q + n, base:base + start + n] = keys[None, :] <= torch.arange(start, start + n)[:, None]
            q += n
        pos = torch.cat(positions)[None].to(self.device)
        self.cache.plan = ("prefill", plan, kv_offset)
        chunk = torch.tensor([tokens], dtype=torch.long, device=self.device)
        mask = allowed.to(self.device)[None, None]
        adapters = [row.req.adapter for row, _ in segments]
        if len(set(adapters)) > 1 and not self.mixed_adapters:
            raise TunesmithError("prompts of different adapters in one prefill")
        # peft's mixed-adapter forward takes one adapter per batch row: one packed row needs one adapter, so several
        # adapters' prompts run one forward each
        # (a sliding-window model's mask is by position: its prompts are not packed)
        if len(segments) > 1 and (len(set(adapters)) > 1 or self.sliding):
            for seg in segments:
                self._prefill([seg])
            return
        ends = list(itertools.accumulate(n for _, n in segments))
        logits = self._forward(chunk, pos, self._masks(mask, pos), [adapters[0]],
                               keep=torch.tensor([e - 1 for e in ends], device=self.device))
        finished = []
        for k, (row, n) in enumerate(segments):
            row.prefilled = row.length = row.prefilled + n
            if row.prefilled == len(row.req.prompt_ids):
                row.prompt_logits = logits[0, k].clone()
                finished.append(row)
        if finished:
            self._choose(finished, torch.stack([r.prompt_logits for r in finished]).clone())
            self._emit(finished)

    def _decode(self, rows: list[_Row]) -> None:
        ids = torch.tensor([[r.next_token] for r in rows], dtype=torch.long, device=self.device)
        positions = torch.tensor([r.length for r in rows], dtype=torch.long, device=self.device)
        kv_len = int(positions.max()) + 1
        self.cache.ensure(kv_len)
        allowed = torch.arange(kv_len, device=self.device)[None, :] <= positions[:, None]
        self.cache.plan = ("decode", positions, kv_len)
        logits = self._forward(ids, positions[:, None], self._masks(allowed[:, None, None, :], positions[:, None]),
                               [r.req.adapter for r in rows])
        for r in rows:
            r.length += 1
        self.generated_tokens += len(rows)
        self._choose(rows, logits[:, -1])
        self._emit(rows)

    def _masks(self, allowed: torch.Tensor, q_pos: torch.Tensor):
        """The 4D boolean mask (True: attend); for models with sliding-window layers, theirs too."""
        if not self.sliding:
            return allowed
        window = self.sliding
        kv = torch.arange(allowed.shape[-1], device=allowed.device)
        near = kv[None, None, None, :] > (q_pos[:, None, :, None] - window)
        return {"full_attention": allowed, "sliding_attention": allowed & near}

    def _forward(self, ids, position_ids, mask, adapters: list[str | None], keep=1) -> torch.Tensor:
        """Logits at the last position of each row (`keep=1`), or at the positions `keep` (a tensor: a packed
        prefill's segment ends; the vocabulary head runs nowhere else)."""
        kwargs = dict(input_ids=ids, position_ids=position_ids, attention_mask=mask, past_key_values=self.cache,
                      use_cache=True, logits_to_keep=keep if torch.is_tensor(keep) else (1 if ids.shape[1] > 1 else 0))
        if self.peft:
            if self.mixed_adapters and any(a is not None for a in adapters):  # else the active adapter's plain forward
                kwargs["adapter_names"] = [a if a is not None else self._active_adapter() for a in adapters]
                return self.model(**kwargs).logits.float()
            if adapters[0] == BASE:
                with self.model.disable_adapter():
                    return self.model(**kwargs).logits.float()
            if adapters[0] is not None:
                self.model.set_adapter(adapters[0])
        return self.model(**kwargs).logits.float()

    def _active_adapter(self) -> str:
        active = self.model.active_adapter
        return active if isinstance(active, str) else active[0]

    # -- tokens and text --------------------------------------------------------------------------------------------
    def _choose(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Each row's next token (sampling.pick_tokens), recorded on its request."""
        tokens = pick_tokens(logits, [r.req.sampling for r in rows], [r.seen for r in rows],
                             [r.req._generator for r in rows])
        now = time.monotonic()
        for r, token in zip(rows, tokens.tolist()):
            req = r.req
            if req.first_token is None:
                req.first_token = now
            req.output_ids.append(token)
            if req.sampling.repetition_penalty != 1.0 or req.sampling.no_repeat_ngram_size:
                r.seen = torch.cat([r.seen, torch.tensor([token])])
            r.next_token = token

    def _emit(self, rows: list[_Row]) -> None:
        finished = []
        for r in rows:
            req = r.req
            ended = req.output_ids[-1] in self.eos
            shown = req.output_ids[:-1] if ended else req.output_ids
            text = self.tokenizer.decode(shown, skip_special_tokens=True)
            stop_at = first_stop(text, req.stop)
            if stop_at is not None:
                req.text, reason = text[:stop_at], "stop"
            elif ended:
                req.text, reason = text, "stop"
            elif len(req.output_ids) >= req.sampling.max_new_tokens:
                req.text, reason = text, "length"
            else:
                req.text, reason = text, None
            final = reason is not None
            self._send(req, final)
            if final:
                req.finish_reason = reason
                finished.append(r)
        self._retire(finished, None)

    def _send(self, req: Request, final: bool) -> None:
        """Hand the text that is settled to the streaming callback: not a trailing replacement character (an
        unfinished UTF-8 sequence), not a tail that could still become a stop string."""
        if req.on_text is None:
            return
        text = req.text
        end = len(text)
        if not final:
            if text.endswith("\ufffd"):
                end = len(text.rstrip("\ufffd"))
            end = min(end, len(text) - stop_prefix_tail(text, req.stop))
        if end > req._sent and text.startswith(text[:req._sent]):
            req.on_text(text[req._sent:end])
            req._sent = end

    def _retire(self, rows: list[_Row], reason: str | None) -> None:
        """Finished or cancelled rows leave their slots; the last rows move into the gaps (slots stay contiguous)."""
        if not rows:
            return
        gone = {id(r) for r in rows}
        for r in rows:
            if reason is not None:
                r.req.finish_reason = reason
            self._finish(r.req)
        kept = [r for r in self.rows if id(r) not in gone]
        for new_slot, r in enumerate(kept):
            if r.slot != new_slot:
                self.cache.move(r.slot, new_slot, r.length)
                r.slot = new_slot
        self.rows = kept

    def _fail(self, rows: list[_Row], message: str) -> None:
        for r in rows:
            r.req.error = message
        self._retire(rows, "error")

    def _finish_waiting(self, req: Request, reason: str, error: str | None = None) -> None:
        req.finish_reason, req.error = reason, error
        self._finish(req)

    def _finish(self, req: Request) -> None:
        req.finished_at = time.monotonic()
        req._done.set()
        if req.on_done is not None:
            try:
                req.on_done(req)
            except Exception:  # a callback's failure is its own
                pass


def eos_ids(tokenizer, model) -> list[int]:
    """The tokens that end an answer: the tokenizer's EOS, the model's generation config's, and the end-of-turn tags
    of the common chat templates."""
    ids = {tokenizer.eos_token_id}
    cfg_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(cfg_eos if isinstance(cfg_eos, list) else [cfg_eos])
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = 0
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def _sliding_window(config) -> int | None:
    layer_types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None)
    return window if window and "sliding_attention" in layer_types else None
