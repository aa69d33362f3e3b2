"""What was trained is what is served (issue 31): a run trained with a system prompt, and one with a text template
whose instruction is fixed, are prompted on every deployment path (generate, chat, serve, the Ollama Modelfile, the
GGUF chat template) exactly as training rendered their prompts."""
import re

import pytest
import torch

from tunesmith.data import prepare
from tunesmith.data.shapes import user_text
from tunesmith.export.gguf_file import chat_template_of
from tunesmith.export.modelfile import modelfile
from tunesmith.methods.load import prompt_format
from tunesmith.models import load_tokenizer
from tunesmith.train.loop import train
from conftest import write_jsonl
from test_train import tiny_cfg

TEXT_TEMPLATE = "{instruction}\n\nModern: {input}\nOld: {output}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("prompts")
    verses = write_jsonl(tmp / "verses.jsonl", [{"instruction": "Rewrite the verse in the old style.", "input": f"you ran {i}",
                                                 "output": f"thou didst run {i}"} for i in range(30)])
    chats = write_jsonl(tmp / "chats.jsonl", [{"instruction": f"Say {i}.", "output": f"{i} {i}"} for i in range(30)])
    text = train(tiny_cfg(tmp, tiny_model_dir, verses, f"data.template={TEXT_TEMPLATE!r}".replace("'", '"'),
                          "train.max_steps=2", "output.name=text")).run_dir
    chat = train(tiny_cfg(tmp, tiny_model_dir, chats, "data.system_prompt=Answer in two words.", "train.max_steps=2",
                          "output.name=chat")).run_dir
    return {"text": text, "chat": chat}


def trained_prompts(run):
    """(user message, the prompt training rendered) for the run's held-out examples."""
    from tunesmith.config import load_config

    cfg = load_config(str(run / "config.yaml"))
    tok = load_tokenizer(run / "final")
    fmt = prompt_format(run / "final")
    val = prepare(cfg.data, tok).val
    users = [ex.fields[fmt.user_field] if fmt.user_field else user_text(ex) for ex in val.examples]
    return tok, fmt, list(zip(users, [r.prompt for r in val.rendered]))


@pytest.mark.parametrize("kind", ["text", "chat"])
def test_generate_chat_and_serve_render_prompts_as_training_did(runs, kind, monkeypatch):
    from fastapi.testclient import TestClient

    from tunesmith.export.chat import chat_loop
    from tunesmith.export.serve import build_app, load_served
    from tunesmith.models.generate import Sampling

    run = runs[kind]
    tok, fmt, pairs = trained_prompts(run)
    assert (fmt.constants == {"instruction": "Rewrite the verse in the old style."} and fmt.user_field == "input"
            if kind == "text" else fmt.system_prompt == "Answer in two words.")
    for user, prompt in pairs:  # generate (cmd_generate renders with this)
        assert fmt.render([{"role": "user", "content": user}], tok) == prompt
    user, prompt = pairs[0]
    expected = tok(prompt, add_special_tokens=fmt.add_special_tokens)["input_ids"]

    class Recorder(torch.nn.Module):  # chat: what the model is asked to continue
        def __init__(self):
            super().__init__()
            self.w, self.seen = torch.nn.Parameter(torch.zeros(1)), []

        def generate(self, input_ids, streamer, **kw):
            self.seen.append(input_ids[0].tolist())
            streamer.end()

    recorder = Recorder()
    lines = iter([user, "/quit"])
    chat_loop(recorder, tok, Sampling(max_new_tokens=2), fmt, read=lambda _: next(lines), write=lambda _: None)
    assert recorder.seen == [expected]

    served = load_served([str(run)], merge=False, loopback_only_hosts=False)  # serve
    submitted = []
    real_submit = served.engine.submit
    monkeypatch.setattr(served.engine, "submit", lambda r: submitted.append(list(r.prompt_ids)) or real_submit(r))
    with TestClient(build_app(served)) as client:
        r = client.post("/v1/chat/completions", json={"model": run.name, "max_tokens": 2,
                                                      "messages": [{"role": "user", "content": user}]})
        assert r.status_code == 200, r.text
    served.engine.stop()
    assert submitted == [expected]


@pytest.mark.parametrize("kind", ["text", "chat"])
def test_the_modelfile_and_the_gguf_chat_template_render_prompts_as_training_did(runs, kind):
    run = runs[kind]
    tok, fmt, pairs = trained_prompts(run)
    text = modelfile("m.gguf", tok, fmt)
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    system = re.search(r'SYSTEM """(.*?)"""', text, re.S)
    for user, prompt in pairs:
        rendered = _ollama(template, system.group(1) if system else "", user)  # as Ollama fills it
        assert rendered == prompt
        gguf = tok.apply_chat_template([{"role": "user", "content": user}], chat_template=chat_template_of(fmt, tok),
                                       tokenize=False, add_generation_prompt=True)
        assert gguf == prompt
    assert (system is not None) == (kind == "chat")


def _ollama(template: str, system: str, prompt: str) -> str:
    """The Go-template subset our Modelfiles use: {{ if .System }}A{{ else }}B{{ end }}, .System, .Prompt, .Response."""
    m = re.fullmatch(r"\{\{ if \.System \}\}(.*)\{\{ else \}\}(.*)\{\{ end \}\}(.*)", template, re.S)
    if m:
        template = (m.group(1) if system else m.group(2)) + m.group(3)
    return template.replace("{{ .System }}", system).replace("{{ .Prompt }}", prompt).replace("{{ .Response }}", "")
