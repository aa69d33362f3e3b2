"""Turn an `Example` into text, the character spans that are trained, and then tokens + labels.

Two renderers:
  * `chat`: the tokenizer's own chat template. The trained span of assistant turn i is the text
    between the template rendered up to turn i (with the generation prompt) and the template
    rendered through turn i, so the model's end-of-turn token is trained.
  * a text template with `{field}` placeholders (named: alpaca, instruct, qa). The last placeholder
    is the response; it, the rest of the template and the EOS token are trained. `[[...]]` marks an
    optional part, dropped when all placeholders in it are empty.

Labels come from the trained character spans and the tokenizer's offsets, never from pad ids
(with pad = eos that would silently teach the model never to stop).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from tunesmith.data.shapes import Example
from tunesmith.errors import TunesmithError

IGNORE = -100
NAMED_TEMPLATES = {
    "alpaca": ("Below is an instruction that describes a task. Write a response that appropriately completes the request."
               "\n\n### Instruction:\n{instruction}\n\n[[### Input:\n{input}\n\n]]### Response:\n{output}"),
    "instruct": "### Instruct:\n{instruction}\n[[{input}\n]]### Output:\n{output}\n### End",
    "qa": "Question: {instruction}[[\n{input}]]\nAnswer: {output}",
}
PLACEHOLDER = re.compile(r"\{(\w+)\}")
OPTIONAL = re.compile(r"\[\[(.*?)\]\]", re.S)


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]]  # trained character spans
    prompt: str                   # what generation starts from (everything before the last response)
    reference: str                # the last response


@dataclass
class Tokenized:
    input_ids: np.ndarray  # int32
    labels: np.ndarray     # int32, IGNORE where not trained (not shifted: position t predicts t+1)
    truncated: bool = False
    label: int | None = None  # classification: the class index (labels are then all IGNORE)
    rejected: "Tokenized | None" = None  # preference pairs: this is the chosen sequence, that the rejected one


@dataclass
class Split:
    examples: list[Example]
    rendered: list[Rendered]
    tokens: list[Tokenized]


@dataclass
class PreparedData:
    """Tokenized train/validation splits (data/prepare.py); the training split keeps only its tokens unless prepared
    for inspection. `stats`: every count, and the data fingerprint."""
    format: str
    train: Split
    val: Split
    stats: dict = field(default_factory=dict)


def template_text(template: str) -> str:
    return NAMED_TEMPLATES.get(template, template)


@dataclass(frozen=True)
class PromptFormat:
    """How training rendered a prompt, so that every deployment (generate, chat, serve, the Ollama Modelfile, a GGUF's
    chat template, the studio) renders a user's message exactly the same way: the chat template with the run's
    default system prompt, or its text template with the fields that held one value in all the training data
    (a fixed instruction) filled in and the user's message in the field that varied. Saved with the trained model
    (final/tunesmith_prompt.json). `template`: "chat", a text template, or "text" (raw text: the prompt is the text)."""
    template: str = "chat"
    system_prompt: str | None = None
    constants: dict = field(default_factory=dict)
    user_field: str | None = None
    add_special_tokens: bool = False  # what training tokenized with (chat templates write their own special tokens)

    def render(self, messages: list[dict], tokenizer) -> str:
        """The prompt for a conversation that ends with a user turn (a text template reads the last user message)."""
        if self.template == "chat":
            if self.system_prompt and (not messages or messages[0]["role"] != "system"):
                messages = [{"role": "system", "content": self.system_prompt}] + list(messages)
            if not getattr(tokenizer, "chat_template", None):
                raise TunesmithError("this model has no chat template; use a text template or raw text")
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        if self.template == "text":
            return user
        template = template_text(self.template)
        fields = {name: "" for name in PLACEHOLDER.findall(template)}
        fields.update(self.constants)
        if self.user_field:
            fields[self.user_field] = user
        return _render_template(Example([{"role": "user", "content": user}], "prompt", fields), template, tokenizer).prompt

    def to_json(self) -> dict:
        return {"template": self.template, "system_prompt": self.system_prompt, "constants": self.constants,
                "user_field": self.user_field, "add_special_tokens": self.add_special_tokens}

    @classmethod
    def from_json(cls, d: dict) -> "PromptFormat":
        return cls(d.get("template", "chat"), d.get("system_prompt"), dict(d.get("constants") or {}), d.get("user_field"),
                   bool(d.get("add_special_tokens", False)))


def prompt_format_of(template: str, system_prompt: str | None, examples: list[Example]) -> PromptFormat:
    """The PromptFormat of data rendered with `template` (data.template) and `system_prompt`, read off `examples`
    (the held-out split) for a text template's fixed fields."""
    if examples and examples[0].messages and examples[0].messages[0]["role"] == "text":
        return PromptFormat("text", add_special_tokens=template != "chat")
    if template == "chat":
        return PromptFormat("chat", system_prompt)
    names = PLACEHOLDER.findall(template_text(template))
    prompt_fields = names[:-1]  # the last placeholder is the response
    constants, varying = {}, []
    for name in prompt_fields:
        values = {ex.fields.get(name, "") for ex in examples}
        if len(values) == 1 and next(iter(values)).strip():
            constants[name] = next(iter(values))
        else:
            varying.append(name)
    user = varying[0] if varying else (prompt_fields[0] if prompt_fields else None)
    return PromptFormat(template, None, {k: v for k, v in constants.items() if k != user}, user, add_special_tokens=True)


def render(ex: Example, template: str, tokenizer, train_on_prompt: bool = False, system_prompt: str | None = None) -> Rendered:
    if ex.messages and ex.messages[0]["role"] == "text":  # raw text: every token is trained
        text = ex.messages[0]["content"] + (tokenizer.eos_token or "")
        return Rendered(text, [(0, len(text))], "", ex.messages[0]["content"])
    if template == "chat":
        r = _render_chat(ex.messages, tokenizer, system_prompt)
    else:
        r = _render_template(ex, template_text(template), tokenizer)
    if train_on_prompt:
        r.spans = [(0, len(r.text))]
    return r


def _render_chat(messages: list[dict], tokenizer, system_prompt: str | None) -> Rendered:
    if not getattr(tokenizer, "chat_template", None):
        raise TunesmithError("data.template is 'chat' but this tokenizer has no chat template; use a text template such as data.template=alpaca")
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages

    def fmt(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    full = fmt(messages, False)
    spans, prompt = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = fmt(messages[:i], True)
        through = full if i == len(messages) - 1 else fmt(messages[: i + 1], False)
        if not (full.startswith(before) and full.startswith(through)):
            raise TunesmithError("the tokenizer's chat template does not render conversations prefix by prefix, so "
                                 "assistant turns cannot be located for masking; use a text template (data.template=...)")
        spans.append((len(before), len(through)))
        prompt = before
    return Rendered(full, spans, prompt, messages[max(i for i, m in enumerate(messages) if m["role"] == "assistant")]["content"])


def _render_template(ex: Example, template: str, tokenizer) -> Rendered:
    names = PLACEHOLDER.findall(template)
    if not names:
        raise TunesmithError(f"data.template {template!r} has no {{field}} placeholders; named templates: chat, {', '.join(NAMED_TEMPLATES)}")
    missing = [n for n in names if n not in ex.fields]
    if missing:
        have = ", ".join(sorted(ex.fields)) or "none (multi-turn chats need data.template=chat)"
        raise TunesmithError(f"{ex.where}: data.template uses {{{missing[0]}}} but the record has fields: {have}")
    response = names[-1]
    cut = template.rindex("{" + response + "}")

    def fill(part: str) -> str:
        part = OPTIONAL.sub(lambda m: m.group(1) if any(ex.fields.get(n, "").strip() for n in PLACEHOLDER.findall(m.group(1))) else "", part)
        return PLACEHOLDER.sub(lambda m: str(ex.fields.get(m.group(1), "")), part)

    prompt = fill(template[:cut])
    answer = ex.fields[response] + fill(template[cut + len(response) + 2:]) + (tokenizer.eos_token or "")
    return Rendered(prompt + answer, [(len(prompt), len(prompt) + len(answer))], prompt, ex.fields[response])


def tokenize(rendered: list[Rendered], tokenizer, template: str, max_length: int, overlong: str = "drop",
             drops: Counter | None = None) -> list[Tokenized | None]:
    """Batched tokenization with offsets; None marks an example dropped, and `drops` counts why
    ("dropped_overlong", or "dropped_no_labels" when no trained token is left). `overlong` is `data.overlong`:
    an example over `max_length` is dropped, cut at its end (`truncate`) or cut at its start (`truncate_left`)."""
    drops = Counter() if drops is None else drops
    if not rendered:
        return []
    add_special = template != "chat"  # chat templates write their own special tokens
    out: list[Tokenized | None] = []
    for start in range(0, len(rendered), ENCODE_CHUNK):  # chunks bound the tokenizer's own memory
        chunk = rendered[start: start + ENCODE_CHUNK]
        for r, (ids, offsets) in zip(chunk, encode_texts(tokenizer, [r.text for r in chunk], add_special)):
            out.append(_labelled(r, ids, offsets, max_length, overlong, drops))
    return out


ENCODE_CHUNK = 2048


def encode_texts(tokenizer, texts: list[str], add_special: bool):
    """(ids, offsets[n, 2]) per text; the Rust tokenizer directly when there is one (3x faster than
    going through transformers' per-encoding conversion)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # the Rust tokenizer keeps the padding and truncation a transformers call last set on it (a left-padded
        # generation batch): examples must not come out padded
        if backend.padding is not None:
            backend.no_padding()
        if backend.truncation is not None:
            backend.no_truncation()
        for e in backend.encode_batch(texts, add_special_tokens=add_special):
            yield np.asarray(e.ids, dtype=np.int32), np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2)
        return
    enc = tokenizer(texts, add_special_tokens=add_special, return_offsets_mapping=True)
    for ids, offsets in zip(enc["input_ids"], enc["offset_mapping"]):
        yield np.asarray(ids, dtype=np.int32), np.asarray(offsets, dtype=np.int64).reshape(-1, 2)


def _labelled(r: Rendered, ids: np.ndarray, offsets: np.ndarray, max_length: int, overlong: str,
              drops: Counter) -> Tokenized | None:
    starts, ends = offsets[:, 0], offsets[:, 1]
    trained = np.zeros(len(ids), dtype=bool)
    for a, b in r.spans:
        trained |= (ends > a) & (starts < b)
    trained &= ends > starts  # tokens with no text (e.g. an added BOS) are never targets
    truncated = len(ids) > max_length
    if truncated:
        if overlong == "drop":
            drops["dropped_overlong"] += 1
            return None
        ids, trained = (ids[:max_length], trained[:max_length]) if overlong == "truncate" else \
            (ids[-max_length:], trained[-max_length:])
    trained[0] = False  # position 0 is never predicted
    if not trained.any():
        drops["dropped_no_labels"] += 1
        return None
    return Tokenized(ids, np.where(trained, ids, IGNORE).astype(np.int32), truncated)


def cut_start(t: Tokenized, n: int) -> Tokenized | None:
    """`t` without its first `n` tokens (`data.overlong: truncate_left`); None when no trained token is left."""
    if n <= 0:
        return t
    labels = t.labels[n:].copy()
    if len(labels):
        labels[0] = IGNORE  # position 0 is never predicted
    if not (labels != IGNORE).any():
        return None
    return Tokenized(t.input_ids[n:], labels, True, t.label)
