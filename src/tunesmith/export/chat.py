"""`tunesmith chat`: talk to a run or a model in the terminal, prompted as the run was trained (its chat template and
system prompt, or its text template: data.render.PromptFormat), streaming tokens as they come. `/reset` clears the
conversation, `/system TEXT` sets a system message (replacing the run's), `/quit` (or Ctrl-D) leaves."""
from __future__ import annotations

import sys
import threading

import torch
from transformers import TextIteratorStreamer

from tunesmith.data.render import PromptFormat
from tunesmith.models.generate import Sampling, eos_ids
from tunesmith.run.log import printable


def chat_loop(model, tokenizer, sampling: Sampling, fmt: PromptFormat = PromptFormat(), read=input,
              write=sys.stdout.write) -> None:
    if fmt.template == "chat" and not getattr(tokenizer, "chat_template", None):
        write("this model has no chat template; use `tunesmith generate --raw` instead\n")
        return
    system, history = None, []
    write("chat: /reset, /system TEXT, /quit\n")
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            history = []
            write("(conversation cleared)\n")
            continue
        if line.startswith("/system"):
            system = line[len("/system"):].strip() or None
            history = []
            write(f"(system message {'set' if system else 'cleared'}; conversation cleared)\n")
            continue
        history.append({"role": "user", "content": line})
        msgs = ([{"role": "system", "content": system}] if system else []) + history
        prompt = fmt.render(msgs, tokenizer)
        ids = tokenizer(prompt, add_special_tokens=fmt.add_special_tokens, return_tensors="pt")["input_ids"]
        ids = ids.to(next(model.parameters()).device)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=sampling.max_new_tokens,
                  eos_token_id=eos_ids(tokenizer, model), pad_token_id=tokenizer.pad_token_id, streamer=streamer,
                  do_sample=sampling.do_sample)
        if sampling.do_sample:
            kw.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
        else:
            kw.update(temperature=None, top_p=None, top_k=None)
        worker = threading.Thread(target=_generate, args=(model, kw))
        worker.start()
        write("bot> ")
        reply = ""
        for piece in streamer:
            reply += piece
            write(printable(piece))
            sys.stdout.flush()
        worker.join()
        write("\n")
        history.append({"role": "assistant", "content": reply.strip()})


def _generate(model, kw) -> None:
    with torch.no_grad():
        model.generate(**kw)
