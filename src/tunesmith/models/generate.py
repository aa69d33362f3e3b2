"""Batched, left-padded, KV-cached generation (greedy by default)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tunesmith.run.log import progress_bar


@dataclass
class Sampling:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    no_repeat_ngram_size: int = 0
    num_beams: int = 1  # beam search (with do_sample False); 1 = greedy
    seed: int = 0


@dataclass
class Generation:
    text: str
    new_tokens: int
    stopped: bool  # ended on an end-of-sequence token (rather than the length cap)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], sampling: Sampling = Sampling(), batch_size: int = 16,
             add_special_tokens: bool = False, progress: str | None = None) -> list[Generation]:
    """Answers in the order of `prompts`; batches are formed from prompts of similar length (less padding).
    `progress`: a label for a progress bar over the prompts on stderr (long generations: eval, a teacher's answers)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos = eos_ids(tokenizer, model)
    torch.manual_seed(sampling.seed)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]] if prompts else []
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    out: dict[int, Generation] = {}
    bar = progress_bar(len(prompts), progress, "prompt", disable=progress is None)
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                            add_special_tokens=add_special_tokens).to(device)
            kwargs = dict(max_new_tokens=sampling.max_new_tokens, do_sample=sampling.do_sample, eos_token_id=eos, use_cache=True,
                          pad_token_id=tokenizer.pad_token_id, no_repeat_ngram_size=sampling.no_repeat_ngram_size or None)
            if sampling.do_sample:
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
        bar.close()
        tokenizer.padding_side = side
        model.train(was_training)
    return [out[i] for i in range(len(prompts))]


def eos_ids(tokenizer, model) -> list[int]:
    ids = {tokenizer.eos_token_id}
    cfg_eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(cfg_eos if isinstance(cfg_eos, list) else [cfg_eos])
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)
