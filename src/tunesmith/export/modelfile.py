"""Ollama Modelfile whose TEMPLATE and stop words reproduce the prompt format used in training.

Chat-template runs: the tokenizer's own template is rendered around placeholders (with and without
a system message) and the placeholders become Ollama's `{{ .System }}` / `{{ .Prompt }}`, so
whatever the template does (ChatML tags, a default system prompt) is kept exactly. Text-template
runs (`alpaca`, `instruct`, `qa`, your own): the template's prompt part with `{{ .Prompt }}` in
the first field. Stop words: the EOS token, the end-of-turn tag, and a text template's closing text.
"""
from __future__ import annotations

from tunesmith.data.render import OPTIONAL, PLACEHOLDER, template_text

SYS, USER = "\u2063SYSTEM\u2063", "\u2063PROMPT\u2063"


def modelfile(gguf_name: str, tokenizer, data_template: str) -> str:
    if data_template == "chat":
        template, stops = _chat_template(tokenizer)
    else:
        template, stops = _text_template(template_text(data_template), tokenizer)
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{s}"' for s in dict.fromkeys(s for s in stops if s)]
    return "\n".join(lines) + "\n"


def _chat_template(tokenizer) -> tuple[str, list[str]]:
    def render(msgs):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    with_sys = render([{"role": "system", "content": SYS}, {"role": "user", "content": USER}])
    without = render([{"role": "user", "content": USER}])
    go = lambda s: s.replace(SYS, "{{ .System }}").replace(USER, "{{ .Prompt }}")  # noqa: E731
    template = "{{ if .System }}" + go(with_sys) + "{{ else }}" + go(without) + "{{ end }}{{ .Response }}"
    stops = [tokenizer.eos_token] + [t for t in ("<|im_end|>", "<|eot_id|>", "<|end|>") if t in tokenizer.get_vocab()]
    return template, stops


def _text_template(template: str, tokenizer) -> tuple[str, list[str]]:
    names = PLACEHOLDER.findall(template)
    response = names[-1]
    cut = template.rindex("{" + response + "}")
    prompt = OPTIONAL.sub("", template[:cut])  # optional parts (e.g. the input block) are left out
    first = PLACEHOLDER.findall(prompt)[0] if PLACEHOLDER.findall(prompt) else None
    prompt = PLACEHOLDER.sub(lambda m: "{{ .Prompt }}" if m.group(1) == first else "", prompt)
    closing = template[cut + len(response) + 2:].strip()
    return prompt + "{{ .Response }}", [closing, tokenizer.eos_token]
