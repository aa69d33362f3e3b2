"""Ollama Modelfile whose TEMPLATE, SYSTEM and stop words reproduce the prompts of training (data.render.PromptFormat).

Chat-template runs: the tokenizer's own template is rendered around placeholders (with and without a system message)
and the placeholders become Ollama's `{{ .System }}` / `{{ .Prompt }}`, so whatever the template does (ChatML tags, a
default system prompt) is kept exactly; the run's `data.system_prompt` is the Modelfile's SYSTEM (Ollama's default
system message, as training's). Text-template runs (`alpaca`, `instruct`, `qa`, your own): the template's prompt part
with the fields that were fixed in training filled in and `{{ .Prompt }}` where the user's text went. Stop words: the
EOS token, the end-of-turn tag, and a text template's closing text.

Ollama's Modelfile has no escapes inside quoted strings: a template containing `\"\"\"` cannot be written (an error),
and a stop word containing a quote or a line break is left out (it would end the string early).
"""
from __future__ import annotations

from tunesmith.data.render import PLACEHOLDER, PromptFormat, template_text
from tunesmith.errors import TunesmithError

SYS, USER = "\u2063SYSTEM\u2063", "\u2063PROMPT\u2063"


def modelfile(gguf_name: str, tokenizer, fmt: PromptFormat) -> str:
    if fmt.template == "chat":
        template, stops = _chat_template(tokenizer)
    else:
        template, stops = _text_template(fmt, tokenizer)
    for text in (template, fmt.system_prompt or ""):
        if '"""' in text:
            raise TunesmithError('the prompt format contains """, which an Ollama Modelfile cannot quote; '
                                 "export --format gguf and write the Modelfile by hand")
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    if fmt.template == "chat" and fmt.system_prompt:
        lines.append(f'SYSTEM """{fmt.system_prompt}"""')
    lines += [f'PARAMETER stop "{s}"' for s in dict.fromkeys(s for s in stops if s and '"' not in s and "\n" not in s)]
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


def _text_template(fmt: PromptFormat, tokenizer) -> tuple[str, list[str]]:
    prompt = fmt.render([{"role": "user", "content": USER}], tokenizer).replace(USER, "{{ .Prompt }}")
    template = template_text(fmt.template) if fmt.template != "text" else ""
    names = PLACEHOLDER.findall(template)
    closing = template[template.rindex("{" + names[-1] + "}") + len(names[-1]) + 2:].strip() if names else ""
    return prompt + "{{ .Response }}", [closing, tokenizer.eos_token]
