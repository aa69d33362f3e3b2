"""Generation for evaluation, the run's side-by-side samples and sequence distillation: prompts in, answers out, in
the prompts' order. Runs on the generation engine (models/engine.py: continuous batching, one prefill per prompt);
beam search and prompt/prefix-tuned models (virtual tokens) take `model.generate` on left-padded batches instead.

Generation starts the global torch generator from the sampling seed (as it always has), so the random draws a run
makes after its samples do not depend on how many tokens the samples took.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tunesmith.models.engine import Engine, Request, Sampling, eos_ids, supports
from tunesmith.run.log import progress_bar

__all__ = ["Generation", "Sampling", "eos_ids", "generate"]


@dataclass
class Generation:
    text: str
    new_tokens: int
    stopped: bool  # ended on an end-of-sequence token or a stop string (rather than the length cap)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], sampling: Sampling | None = None, batch_size: int = 16,
             add_special_tokens: bool = False, progress: str | None = None, stop: list[str] | None = None,
             rows: int = 32) -> list[Generation]:
    """Answers in the order of `prompts`. `progress`: a label for a progress bar over the prompts on stderr (long
    generations: eval, a teacher's answers). `rows`: the engine's batch; `batch_size`: model.generate's."""
    sampling = sampling or Sampling()
    was_training = model.training
    model.eval()
    torch.manual_seed(sampling.seed)
    bar = progress_bar(len(prompts), progress, "prompt", disable=progress is None)
    try:
        if sampling.num_beams > 1 or supports(model) is not None:
            return _hf_generate(model, tokenizer, prompts, sampling, batch_size, add_special_tokens, bar)
        ids = tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"] if prompts else []
        engine = Engine(model, tokenizer, max_rows=rows)
        requests = [Request(list(p), sampling, list(stop or []), on_done=lambda _: bar.update(1)) for p in ids]
        engine.run(requests)
        for r in requests:
            if r.finish_reason == "error":
                raise RuntimeError(f"generation failed: {r.error}")
        return [Generation(r.text.strip(), len(r.output_ids), r.finish_reason == "stop") for r in requests]
    finally:
        bar.close()
        model.train(was_training)


def _hf_generate(model, tokenizer, prompts, sampling: Sampling, batch_size: int, add_special_tokens: bool, bar):
    """Left-padded batches of similar length through model.generate (beam search; virtual-token models)."""
    device = next(model.parameters()).device
    eos = eos_ids(tokenizer, model)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]] if prompts else []
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    out: dict[int, Generation] = {}
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                            add_special_tokens=add_special_tokens).to(device)
            kwargs = dict(max_new_tokens=sampling.max_new_tokens, do_sample=not sampling.greedy, eos_token_id=eos,
                          use_cache=True, pad_token_id=tokenizer.pad_token_id,
                          no_repeat_ngram_size=sampling.no_repeat_ngram_size or None,
                          repetition_penalty=sampling.repetition_penalty if sampling.repetition_penalty != 1.0 else None)
            if not sampling.greedy:
                kwargs.update(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
            else:
                kwargs.update(temperature=None, top_k=None, top_p=None)
                if sampling.num_beams > 1:
                    kwargs.update(num_beams=sampling.num_beams, early_stopping=True)
            seqs = model.generate(**enc, **kwargs)[:, enc["input_ids"].shape[1]:]
            for i, row in zip(idx, seqs.tolist()):
                n = next((j + 1 for j, t in enumerate(row) if t in eos), None)
                used = row[:n] if n else row
                out[i] = Generation(tokenizer.decode(used, skip_special_tokens=True).strip(), len(used), n is not None)
            bar.update(len(idx))
    finally:
        tokenizer.padding_side = side
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and backend.padding is not None:
            backend.no_padding()  # else the padding stays on in the Rust tokenizer, and in the tokenizer.json a run saves
    return [out[i] for i in range(len(prompts))]


class SerialEngine:
    """The generation engine's interface for models it cannot run (prompt/prefix tuning: virtual tokens): one request
    at a time through model.generate in a worker thread; a request's text arrives in one piece."""

    def __init__(self, model, tokenizer, max_waiting: int = 256, **_):
        import queue
        import threading

        self.model, self.tokenizer, self.max_waiting = model.eval(), tokenizer, max_waiting
        self.queue: queue.Queue = queue.Queue()
        self.heartbeat, self._thread, self._stopping, self._lock = 0.0, None, False, threading.Lock()

    def submit(self, req: Request) -> Request:
        from tunesmith.models.engine import EngineFull

        if self.queue.qsize() >= self.max_waiting:
            raise EngineFull(f"{self.queue.qsize()} requests are waiting already")
        self.queue.put(req)
        return req

    def pending(self) -> int:
        return self.queue.qsize()

    def start(self) -> None:
        import queue
        import threading
        import time

        def loop():
            while not self._stopping:
                self.heartbeat = time.monotonic()
                try:
                    req = self.queue.get(timeout=1.0)
                except queue.Empty:
                    continue
                self._run(req)
        self._thread = threading.Thread(target=loop, name="tunesmith-serial-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        if self._thread:
            self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        import time

        return self._thread is not None and self._thread.is_alive() and time.monotonic() - self.heartbeat < 600

    @torch.no_grad()
    def _run(self, req: Request) -> None:
        from tunesmith.models.sampling import first_stop

        try:
            if not req.cancelled:
                device = next(self.model.parameters()).device
                ids = torch.tensor([req.prompt_ids], device=device)
                s = req.sampling
                if req.adapter not in (None, "__base__"):
                    self.model.set_adapter(req.adapter)
                kwargs = dict(max_new_tokens=s.max_new_tokens, do_sample=not s.greedy, eos_token_id=eos_ids(self.tokenizer, self.model),
                              pad_token_id=self.tokenizer.pad_token_id, attention_mask=torch.ones_like(ids))
                kwargs.update(dict(temperature=s.temperature, top_k=s.top_k or None, top_p=s.top_p) if not s.greedy
                              else dict(temperature=None, top_k=None, top_p=None))
                torch.manual_seed(s.seed)
                out = self.model.generate(ids, **kwargs)[0, ids.shape[1]:].tolist()
                eos = set(kwargs["eos_token_id"])
                end = next((i for i, t in enumerate(out) if t in eos), None)
                req.output_ids = out[: end + 1] if end is not None else out
                text = self.tokenizer.decode(out[:end] if end is not None else out, skip_special_tokens=True)
                cut = first_stop(text, req.stop)
                req.text = text[:cut] if cut is not None else text
                req.finish_reason = "stop" if end is not None or cut is not None else "length"
                if req.on_text and req.text:
                    req.on_text(req.text)
            else:
                req.finish_reason = "cancelled"
        except Exception as e:
            req.finish_reason, req.error = "error", f"{type(e).__name__}: {e}"
        req._done.set()
        if req.on_done:
            req.on_done(req)
