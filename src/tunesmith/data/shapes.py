"""Dataset shapes: detect which one a file has, check every record, normalise to one `Example`.

| format            | fields (after `data.columns` mapping)                                   |
|-------------------|--------------------------------------------------------------------------|
| text              | text                                                                     |
| instruction       | instruction, output, optional input (Alpaca)                             |
| prompt_completion | prompt, completion                                                       |
| chat              | messages: [{role: system/user/assistant, content}, ...] (OpenAI JSONL)   |
| sharegpt          | conversations: [{from: human/gpt/system, value}, ...]                    |
| classification    | text (optional text_pair), label                                         |
| preference        | prompt, chosen, rejected — or OpenAI DPO: input.messages,                |
|                   | preferred_output, non_preferred_output; a run's judgements.jsonl is read |
|                   | as these pairs (winner chosen, loser rejected: data/judgements.py)       |
| prompt            | prompt (text, or a list of messages ending in a user turn): prompts      |
|                   | alone, for online RL; other columns go to the rewards                    |

Every `Example` keeps its record's columns (`columns`, after `data.columns` mapping): online RL passes them to the
reward functions (an `answer` column for an exact-match reward, TRL's convention).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from tunesmith.catalog import TASKS, task_of_format
from tunesmith.data.read import Record
from tunesmith.errors import TunesmithError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant"}


def resolve_task(task: str, data_format: str) -> str:
    """`task` (auto, causal, classification, dpo) for data in `data_format`: auto follows the data."""
    fits = task_of_format(data_format)
    if task == "auto":
        return fits
    if data_format not in TASKS[task].formats:
        raise TunesmithError(f"task={task} does not fit data in {data_format} format ({TASKS[task].data} expected)")
    return task

# detection: first rule whose fields are all present wins
DETECT = [
    ("chat", ("messages",)),
    ("sharegpt", ("conversations",)),
    ("preference", ("chosen", "rejected")),
    ("preference", ("preferred_output", "non_preferred_output")),
    ("instruction", ("instruction", "output")),
    ("prompt_completion", ("prompt", "completion")),
    ("prompt", ("prompt",)),
    ("classification", ("text", "label")),
    ("text", ("text",)),
]


@dataclass
class Example:
    """One normalised record. `messages` is the conversation; `fields` keeps named text fields for text templates."""
    messages: list[dict]
    where: str
    fields: dict = field(default_factory=dict)
    group: Optional[str] = None   # records with the same group stay in the same split
    label: Optional[str] = None   # classification
    chosen: Optional[str] = None  # preference
    rejected: Optional[str] = None
    references: Optional[list] = None  # extra reference answers for evaluation
    columns: dict = field(default_factory=dict)  # the record's fields as read (online RL hands them to the rewards)


def user_text(example: Example) -> str:
    """The last user message (or the raw text): what a person would call the input."""
    users = [m["content"] for m in example.messages if m["role"] in ("user", "text")]
    return users[-1] if users else ""


def map_columns(rec: Record, columns: dict[str, str]) -> dict:
    if not columns:
        return rec.fields
    fields = dict(rec.fields)
    for ours, theirs in columns.items():
        if theirs in fields:
            fields[ours] = fields.pop(theirs)
    return fields


def detect_format(fields: dict, where: str, columns: dict[str, str]) -> str:
    for name, needed in DETECT:
        if all(k in fields for k in needed):
            return name
    have = ", ".join(sorted(fields)) or "none"
    hint = "" if columns else "; map your columns with data.columns (e.g. data.columns={instruction: question, output: answer})"
    raise TunesmithError(f"{where}: cannot tell the data format from the fields ({have}); expected one of: "
                         + "; ".join(f"{n} ({', '.join(f)})" for n, f in DETECT) + hint)


def to_example(fields: dict, fmt: str, where: str) -> Example:
    ex = NORMALISE[fmt](fields, where)
    ex.columns = dict(fields)
    refs = fields.get("references")  # several reference answers (evaluation only), e.g. SciTLDR's all_summaries
    refs = refs.tolist() if hasattr(refs, "tolist") else refs
    if isinstance(refs, (list, tuple)) and refs and all(isinstance(r, str) for r in refs):
        ex.references = list(refs)
    return ex


def _text(fields: dict, key: str, where: str, fmt: str, optional: bool = False) -> str:
    value = fields.get(key)
    if value is None:
        if optional:
            return ""
        if key not in fields:
            raise TunesmithError(f"{where}: missing field {key!r} (format {fmt} expects {', '.join(_fields_of(fmt))}; fields here: {', '.join(sorted(fields))})")
        raise TunesmithError(f"{where}: field {key!r} is empty (null/NaN); expected text")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise TunesmithError(f"{where}: field {key!r} is {type(value).__name__}; expected text")
    return value


def _fields_of(fmt: str) -> tuple:
    return next(f for n, f in DETECT if n == fmt)


def _group(fields: dict) -> Optional[str]:
    g = fields.get("group")
    return None if g is None else str(g)


def _instruction(f: dict, where: str) -> Example:
    instr, inp, out = _text(f, "instruction", where, "instruction"), _text(f, "input", where, "instruction", True), _text(f, "output", where, "instruction")
    user = f"{instr}\n\n{inp}" if inp.strip() else instr
    return Example([{"role": "user", "content": user}, {"role": "assistant", "content": out}], where,
                   {"instruction": instr, "input": inp, "output": out}, _group(f))


def _prompt_completion(f: dict, where: str) -> Example:
    p, c = _text(f, "prompt", where, "prompt_completion"), _text(f, "completion", where, "prompt_completion")
    return Example([{"role": "user", "content": p}, {"role": "assistant", "content": c}], where,
                   {"prompt": p, "completion": c, "instruction": p, "input": "", "output": c}, _group(f))


def _prompt_only(f: dict, where: str) -> Example:
    """A prompt with no answer (online RL): an empty assistant turn marks where generation starts."""
    p = f.get("prompt")
    if isinstance(p, list):
        msgs = _check_messages(p, where, "prompt")
        if msgs[-1]["role"] != "user":
            raise TunesmithError(f"{where}: 'prompt' ends with a {msgs[-1]['role']} turn; a prompt ends with the user's turn")
        user = msgs[-1]["content"]
    else:
        user = _text(f, "prompt", where, "prompt")
        msgs = [{"role": "user", "content": user}]
    return Example(msgs + [{"role": "assistant", "content": ""}], where,
                   {"prompt": user, "completion": "", "instruction": user, "input": "", "output": ""}, _group(f))


def _text_only(f: dict, where: str) -> Example:
    t = _text(f, "text", where, "text")
    return Example([{"role": "text", "content": t}], where, {"text": t}, _group(f))


def _check_messages(msgs, where: str, key: str, roles=ROLES) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise TunesmithError(f"{where}: {key!r} must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise TunesmithError(f"{where}: {key!r}[{i}] is {type(m).__name__}; expected an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in roles:
            raise TunesmithError(f"{where}: {key!r}[{i}].role is {role!r}; expected one of {', '.join(roles)}")
        if not isinstance(content, str):
            raise TunesmithError(f"{where}: {key!r}[{i}].content is {type(content).__name__}; expected text")
        out.append({"role": role, "content": content})
    return out


def _chat(f: dict, where: str) -> Example:
    msgs = _check_messages(f.get("messages"), where, "messages")
    if not any(m["role"] == "assistant" for m in msgs):
        raise TunesmithError(f"{where}: \"messages\" has no assistant turn, so there is nothing to train on")
    return Example(msgs, where, _single_turn_fields(msgs), _group(f))


def _sharegpt(f: dict, where: str) -> Example:
    conv = f.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise TunesmithError(f"{where}: 'conversations' must be a non-empty list of {{from, value}} objects")
    msgs = []
    for i, m in enumerate(conv):
        who = m.get("from") if isinstance(m, dict) else None
        if who not in SHAREGPT_ROLES:
            raise TunesmithError(f"{where}: 'conversations'[{i}].from is {who!r}; expected one of {', '.join(SHAREGPT_ROLES)}")
        if not isinstance(m.get("value"), str):
            raise TunesmithError(f"{where}: 'conversations'[{i}].value is missing or not text")
        msgs.append({"role": SHAREGPT_ROLES[who], "content": m["value"]})
    return _chat({"messages": msgs, "group": f.get("group")}, where)


def _single_turn_fields(msgs: list[dict]) -> dict:
    users = [m["content"] for m in msgs if m["role"] == "user"]
    bots = [m["content"] for m in msgs if m["role"] == "assistant"]
    if len(users) == 1 and len(bots) == 1:
        return {"instruction": users[0], "input": "", "output": bots[0], "prompt": users[0], "completion": bots[0]}
    return {}


def _classification(f: dict, where: str) -> Example:
    text = _text(f, "text", where, "classification")
    label = f.get("label")
    if label is None or (isinstance(label, float) and label != label):
        raise TunesmithError(f"{where}: field 'label' is missing or empty")
    pair = _text(f, "text_pair", where, "classification", optional=True)
    return Example([{"role": "user", "content": text}], where, {"text": text, "text_pair": pair}, _group(f), label=str(label))


def _preference(f: dict, where: str) -> Example:
    if "preferred_output" in f:  # OpenAI DPO JSONL
        inp = f.get("input")
        if not isinstance(inp, dict):
            raise TunesmithError(f"{where}: 'input' must be an object with 'messages' (OpenAI DPO format)")
        prompt = _check_messages(inp.get("messages"), where, "input.messages")
        chosen = _check_messages(f["preferred_output"], where, "preferred_output")[-1]["content"]
        rejected = _check_messages(f["non_preferred_output"], where, "non_preferred_output")[-1]["content"]
    else:
        p = f.get("prompt")
        prompt = _check_messages(p, where, "prompt") if isinstance(p, list) else [{"role": "user", "content": _text(f, "prompt", where, "preference")}]
        chosen, rejected = _text(f, "chosen", where, "preference"), _text(f, "rejected", where, "preference")
    return Example(prompt, where, {}, _group(f), chosen=chosen, rejected=rejected)


NORMALISE = {"text": _text_only, "instruction": _instruction, "prompt_completion": _prompt_completion, "chat": _chat,
             "sharegpt": _sharegpt, "classification": _classification, "preference": _preference,
             "prompt": _prompt_only}
