"""GGUF for llama.cpp / Ollama, written with the `gguf` PyPI package (no llama.cpp checkout, no
scripts fetched at run time). Llama-family models (SmolLM2, Llama, Mistral-style blocks without
biases), in f32, f16 or q8_0, with the tokenizer, chat template and BOS/EOS/padding ids.

Every export is verified by loading it back (transformers reads GGUF) and comparing with the HF
model on fixed prompts: f32 must give the same logits; f16 and q8_0 the same next-token distributions (KL).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from tunesmith.data.render import PromptFormat
from tunesmith.errors import TunesmithError

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM")
FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7}
CHECK_PROMPTS = ["The capital of France is", "def add(a, b):\n    return", "Once upon a time"]
MAX_MEAN_KL, MAX_POSITION_KL = 0.02, 0.2  # nats, f16 / q8_0 exports (verify)
BLOCK_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_gguf(model, tokenizer, path: Path, dtype: str, source_gguf: Path | None = None, fmt: PromptFormat | None = None) -> None:
    import gguf

    arch = (model.config.architectures or [type(model).__name__])[0]
    if arch not in SUPPORTED:
        raise TunesmithError(f"GGUF export supports {', '.join(SUPPORTED)}; this model is {arch}. "
                             f"Export --format hf and convert it with llama.cpp's convert_hf_to_gguf.py")
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(path.stem)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(float(getattr(c, "rope_theta", None) or (getattr(c, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(FILE_TYPE[dtype])
    _tokenizer_metadata(w, tokenizer, source_gguf, fmt or PromptFormat())
    for name, array in _tensors(model):
        data, raw_dtype = _encode(array, dtype)
        w.add_tensor(name, data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tensors(model):
    c = model.config
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    yield "token_embd.weight", sd["model.embed_tokens.weight"]
    for i in range(c.num_hidden_layers):
        for hf, gg in BLOCK_NAMES.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if hf == "self_attn.q_proj":
                t = _permute(t, c.num_attention_heads)
            elif hf == "self_attn.k_proj":
                t = _permute(t, c.num_key_value_heads)
            yield f"blk.{i}.{gg}.weight", t
    yield "output_norm.weight", sd["model.norm.weight"]
    if not c.tie_word_embeddings:
        yield "output.weight", sd["lm_head.weight"]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores q/k rows for rotate-half rotary; llama.cpp expects interleaved pairs (as convert_hf_to_gguf.py)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(array: np.ndarray, dtype: str):
    import gguf

    if array.ndim == 1 or dtype == "f32":  # norms stay f32 in every file type
        return np.ascontiguousarray(array, dtype=np.float32), None
    if dtype == "f16":
        return np.ascontiguousarray(array, dtype=np.float16), None
    q = gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
    return q, gguf.GGMLQuantizationType.Q8_0


def _tokenizer_metadata(w, tokenizer, source_gguf: Path | None, fmt: PromptFormat) -> None:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise TunesmithError(f"GGUF export supports byte-level BPE tokenizers (gpt2-style); this one is {spec['model']['type']}")
    vocab = tokenizer.get_vocab()
    tokens = [""] * len(vocab)
    for tok, i in vocab.items():
        tokens[i] = tok
    special = set(tokenizer.all_special_ids) | {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer_name(source_gguf))
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    w.add_token_merges(merges)
    for setter, tid in (("add_bos_token_id", tokenizer.bos_token_id), ("add_eos_token_id", tokenizer.eos_token_id),
                        ("add_pad_token_id", tokenizer.pad_token_id), ("add_unk_token_id", tokenizer.unk_token_id)):
        if tid is not None:
            getattr(w, setter)(tid)
    w.add_add_bos_token(fmt.add_special_tokens and _adds_bos(tokenizer))  # as training tokenized its prompts
    if template := chat_template_of(fmt, tokenizer):
        w.add_chat_template(template)


def chat_template_of(fmt: PromptFormat, tokenizer) -> str | None:
    """The GGUF's chat template (Jinja, as llama.cpp and Ollama read it): the prompts of training. A chat-template run's
    own template, with its default system prompt put in front when a conversation has none; a text-template run's
    template as Jinja around the last user message."""
    if fmt.template == "chat":
        own = getattr(tokenizer, "chat_template", None)
        if not own or not fmt.system_prompt:
            return own
        return ("{%- if not messages or messages[0]['role'] != 'system' %}{%- set messages = [{'role': 'system', "
                f"'content': {json.dumps(fmt.system_prompt)}}}] + messages %}}{{%- endif %}}" + own)
    marker = "\u2063PROMPT\u2063"
    before, _, after = fmt.render([{"role": "user", "content": marker}], tokenizer).partition(marker)
    last_user = ("{%- set ns = namespace(text='') -%}{%- for m in messages -%}{%- if m['role'] == 'user' -%}"
                 "{%- set ns.text = m['content'] -%}{%- endif -%}{%- endfor -%}")
    return last_user + _raw(before) + "{{ ns.text }}" + _raw(after)


def _raw(text: str) -> str:
    return "{% raw %}" + text + "{% endraw %}" if text else ""


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [bos] != \
        tokenizer("x", add_special_tokens=False)["input_ids"][:1]


def _pre_tokenizer_name(source_gguf: Path | None) -> str:
    """llama.cpp picks its pre-tokenizer regex by name; reuse the source GGUF's when the base came from one."""
    if source_gguf and source_gguf.exists():
        import gguf

        field = gguf.GGUFReader(source_gguf).fields.get("tokenizer.ggml.pre")
        if field is not None:
            return str(field.contents())
    return "default"


@torch.no_grad()
def verify(model, tokenizer, path: Path, dtype: str) -> dict:
    """Load the GGUF back with transformers and compare with `model` on fixed prompts, each followed by the
    model's own 12-token greedy continuation. f32 must give the same logits. f16 and q8_0 round the weights, so
    near-ties may flip a greedy token (a healthy q8_0 SmolLM2 export: "100 people" -> "100 employees"); they must
    give the same next-token distributions instead: KL(model || GGUF) below MAX_MEAN_KL on average over the positions
    and below MAX_POSITION_KL at each (healthy q8_0 SmolLM2 exports: mean 0.001-0.003, largest 0.009 nats; a wrong
    tensor gives tenths to whole nats). Greedy agreement is reported too."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    model = model.float().eval()
    worst, kls, top, same, finite = 0.0, [], [], [], True
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    for prompt in CHECK_PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        text = model.generate(ids, **kw)
        ours, theirs = model(text).logits[0], back(text).logits[0]
        finite = finite and bool(torch.isfinite(theirs).all())  # max(0.0, nan) is 0.0: NaN must fail by itself
        worst = max(worst, float((ours - theirs).abs().max()))
        p, q = ours.log_softmax(-1), theirs.log_softmax(-1)
        kls += (p.exp() * (p - q)).sum(-1).tolist()
        top += (ours.argmax(-1) == theirs.argmax(-1)).tolist()
        same.append(text[0].tolist() == back.generate(ids, **kw)[0].tolist())
    mean_kl = sum(kls) / len(kls)
    ok = finite and (worst < 1e-3 if dtype == "f32" else mean_kl < MAX_MEAN_KL and max(kls) < MAX_POSITION_KL)
    return {"dtype": dtype, "max_logit_diff": round(worst, 6), "mean_kl": round(mean_kl, 6), "max_kl": round(max(kls), 6),
            "same_top_token": round(sum(top) / len(top), 4), "same_greedy_continuation": same, "passed": ok,
            "criterion": "equal logits (< 1e-3)" if dtype == "f32"
            else f"next-token KL < {MAX_MEAN_KL} nats on average, < {MAX_POSITION_KL} at every position"}
