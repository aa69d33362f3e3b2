import json

import pytest

from tunesmith.config import DataConfig
from collections import Counter

from tunesmith.data.prepare import load_examples, prepare, split_examples, tokenize_pairs
from tunesmith.data.render import IGNORE, render, tokenize
from tunesmith.data.shapes import Example
from tunesmith.errors import TunesmithError
from conftest import write_jsonl


def trained_text(tok, t):
    return tok.decode([int(x) for x in t.labels if x != IGNORE])


@pytest.mark.parametrize("row, fmt", [
    ({"text": "hello"}, "text"),
    ({"instruction": "a", "input": "b", "output": "c"}, "instruction"),
    ({"prompt": "a", "completion": "b"}, "prompt_completion"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "chat"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}, "sharegpt"),
    ({"text": "good", "label": "positive"}, "classification"),
    ({"prompt": "a", "chosen": "b", "rejected": "c"}, "preference"),
])
def test_format_detection(tmp_path, row, fmt):
    f = write_jsonl(tmp_path / "d.jsonl", [row])
    assert load_examples(DataConfig(path=str(f)), str(f))[0] == fmt


def test_column_mapping(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"question": "q?", "answer": "a."}])
    fmt, exs, _ = load_examples(DataConfig(path=str(f), columns={"instruction": "question", "output": "answer"}), str(f))
    assert fmt == "instruction" and exs[0].fields["output"] == "a."


def test_bad_role_names_file_line_field(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}] * 2
    rows.append({"messages": [{"role": "user", "content": "a"}, {"role": "asistant", "content": "b"}]})
    f = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(TunesmithError) as e:
        load_examples(DataConfig(path=str(f)), str(f))
    assert "train.jsonl:3: 'messages'[1].role is 'asistant'; expected one of system, user, assistant" in str(e.value)


def test_skip_bad_records_counts_them(tmp_path):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "a"}, {"instruction": "c", "output": "d"}]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    _, exs, counts = load_examples(DataConfig(path=str(f), on_bad_record="skip"), str(f))
    assert len(exs) == 2 and counts["bad_skipped"] == 1 and "missing field 'output'" in counts["bad_samples"][0]


@pytest.mark.parametrize("content, message", [
    ("", "no records"),
    ("{not json}\n", "d.jsonl:1: not valid JSON"),
    ("[1, 2]\n", "expected a JSON object per line"),
])
def test_malformed_jsonl(tmp_path, content, message):
    f = tmp_path / "d.jsonl"
    f.write_text(content)
    with pytest.raises(TunesmithError, match=message.replace("[", r"\[")):
        load_examples(DataConfig(path=str(f)), str(f))


def test_non_utf8_and_csv_nan(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(TunesmithError, match="d.jsonl:2: not UTF-8"):
        load_examples(DataConfig(path=str(f)), str(f))
    c = tmp_path / "d.csv"
    c.write_text("instruction,output\nhi,there\nhello,NaN\n")
    with pytest.raises(TunesmithError, match="d.csv:3: field 'output' is empty"):
        load_examples(DataConfig(path=str(c)), str(c))


def test_chat_masking_trains_assistant_and_end_of_turn(tiny_tokenizer):
    ex = Example([{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "how are you"},
                  {"role": "user", "content": "again"}, {"role": "assistant", "content": "today"}], "x:1")
    r = render(ex, "chat", tiny_tokenizer)
    (t,) = tokenize([r], tiny_tokenizer, "chat", 512, overlong="drop")
    # both assistant turns, each with its end-of-turn token; prompt and pad ids never decide the mask
    assert trained_text(tiny_tokenizer, t) == "how are you<|im_end|>\ntoday<|im_end|>\n"
    assert r.prompt.endswith("<|im_start|>assistant\n") and r.reference == "today"


def test_text_template_masking(tiny_tokenizer):
    ex = Example([], "x:1", {"instruction": "what is two plus two?", "input": "", "output": "four."})
    r = render(ex, "qa", tiny_tokenizer)
    assert r.text == "Question: what is two plus two?\nAnswer: four.<|im_end|>"  # optional [[input]] part dropped
    (t,) = tokenize([r], tiny_tokenizer, "qa", 512, overlong="drop")
    assert trained_text(tiny_tokenizer, t).strip() == "four.<|im_end|>"
    r2 = render(ex, "Q: {instruction} A: {output}", tiny_tokenizer)
    assert r2.prompt == "Q: what is two plus two? A: "


def test_train_on_prompt_and_truncation(tiny_tokenizer):
    ex = Example([{"role": "user", "content": "hello world " * 20}, {"role": "assistant", "content": "hi"}], "x:1")
    r = render(ex, "chat", tiny_tokenizer)
    assert tokenize([r], tiny_tokenizer, "chat", 10, overlong="drop") == [None]   # dropped: too long
    assert tokenize([r], tiny_tokenizer, "chat", 10, overlong="truncate") == [None]    # response truncated away
    full = render(ex, "chat", tiny_tokenizer, train_on_prompt=True)
    (t,) = tokenize([full], tiny_tokenizer, "chat", 512, overlong="drop")
    assert (t.labels[1:] != IGNORE).all()


def test_truncate_left_keeps_the_response_and_cuts_both_sides_of_a_pair_alike(tiny_tokenizer):
    ex = Example([{"role": "user", "content": "hello world " * 20}, {"role": "assistant", "content": "the answer"}], "x:1")
    r = render(ex, "chat", tiny_tokenizer)
    (whole,) = tokenize([r], tiny_tokenizer, "chat", 512)
    (t,) = tokenize([r], tiny_tokenizer, "chat", 16, overlong="truncate_left")
    assert t.truncated and t.input_ids.tolist() == whole.input_ids[-16:].tolist()  # the end is kept, the start cut
    assert t.labels.tolist() == whole.labels[-16:].tolist()                        # the response is trained whole

    pair = Example([{"role": "user", "content": "hello world " * 20}], "x:2", chosen="yes", rejected="no, not at all " * 3)
    cfg = DataConfig(path="x", overlong="truncate_left")
    (whole_c,) = tokenize_pairs([pair], cfg.model_copy(update={"overlong": "drop"}), tiny_tokenizer, 512, Counter()).tokens
    (c,) = tokenize_pairs([pair], cfg, tiny_tokenizer, 100, Counter()).tokens
    j, whole_j = c.rejected, whole_c.rejected
    cut = len(whole_j.input_ids) - 100                               # the longer side fits exactly
    assert len(j.input_ids) == 100 and j.input_ids.tolist() == whole_j.input_ids[cut:].tolist()
    assert c.input_ids.tolist() == whole_c.input_ids[cut:].tolist()  # the shorter side loses the same start
    assert (c.labels != IGNORE).sum() == (whole_c.labels != IGNORE).sum()
    assert tokenize_pairs([pair], cfg, tiny_tokenizer, 30, Counter()).tokens == []  # the chosen answer cut away


def test_split_is_deterministic_and_keeps_groups_together():
    exs = [Example([], f"x:{i}", group=f"mod{i % 7}") for i in range(70)]
    a_train, a_val = split_examples(exs, 0.2, seed=0)
    b_train, b_val = split_examples(exs, 0.2, seed=0)
    assert [e.where for e in a_val] == [e.where for e in b_val]
    assert {e.group for e in a_train}.isdisjoint({e.group for e in a_val})
    assert len(a_train) + len(a_val) == 70


def test_prepare_reports_counts_and_refuses_all_masked(tmp_path, tiny_tokenizer, instruction_file):
    data = prepare(DataConfig(path=str(instruction_file), val_size=0.25), tiny_tokenizer)
    assert data.stats["train"]["kept"] + data.stats["val"]["kept"] == 40
    assert 0 < data.stats["train"]["label_share"] < 1
    with pytest.raises(TunesmithError, match="no training example has a token to learn from"):
        prepare(DataConfig(path=str(instruction_file), max_length=12), tiny_tokenizer)


@pytest.mark.parametrize("suffix", ["json", "csv", "tsv", "parquet", "txt"])
def test_other_file_types(tmp_path, suffix):
    rows = [{"instruction": "a b", "output": "c"}, {"instruction": "d", "output": "e f"}]
    f = tmp_path / f"d.{suffix}"
    if suffix == "json":
        f.write_text(json.dumps(rows))
    elif suffix in ("csv", "tsv"):
        sep = "," if suffix == "csv" else "\t"
        f.write_text(f"instruction{sep}output\n" + "".join(f"{r['instruction']}{sep}{r['output']}\n" for r in rows))
    elif suffix == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), f)
    else:
        f.write_text("first document\nsecond document\n")
    fmt, exs, _ = load_examples(DataConfig(path=str(f)), str(f))
    assert len(exs) == 2 and fmt == ("text" if suffix == "txt" else "instruction")


def test_jsonl_with_unicode_line_separator_inside_a_string(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\n" + json.dumps({"text": "c"}) + "\n", encoding="utf-8")
    _, exs, _ = load_examples(DataConfig(path=str(f)), str(f))
    assert [e.fields["text"] for e in exs] == ["a\u2028b", "c"]


def test_cli_data_inspect_marks_trained_spans(tmp_path, tiny_model_dir, instruction_file, capsys):
    from tunesmith.cli.main import main

    assert main(["data", "inspect", str(instruction_file), "-n", "1", f"model.name={tiny_model_dir}", "data.template=qa"]) == 0
    out = capsys.readouterr().out
    assert "format: instruction (detected)" in out and "kept" in out
    assert "Answer: [train]" in out and "[/train]" in out


def test_cli_data_inspect_classification_and_preference(tmp_path, tiny_model_dir, capsys):
    from tunesmith.cli.main import main

    cls = write_jsonl(tmp_path / "c.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}, {"text": "ok", "label": "pos"}])
    assert main(["data", "inspect", str(cls), f"model.name={tiny_model_dir}"]) == 0
    assert "labels (2): pos 2 (66.7%), neg 1 (33.3%)" in capsys.readouterr().out
    pref = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi", "chosen": "hello", "rejected": "go away"}])
    assert main(["data", "inspect", str(pref), f"model.name={tiny_model_dir}"]) == 0
    assert "rejected: go away" in capsys.readouterr().out


def test_tokenized_cache_is_reused_and_invalidated(tmp_path, tiny_tokenizer, instruction_file):
    cfg = DataConfig(path=str(instruction_file), val_size=0.25)
    first = prepare(cfg, tiny_tokenizer)
    again = prepare(cfg, tiny_tokenizer)
    assert "from_cache" not in first.stats and "from_cache" in again.stats
    assert len(again.train.tokens) == len(first.train.tokens)
    for a, b in zip(first.train.tokens, again.train.tokens):
        assert (a.input_ids == b.input_ids).all() and (a.labels == b.labels).all()
    assert [r.reference for r in again.val.rendered] == [r.reference for r in first.val.rendered]
    # a different template or an edited file is a different dataset
    assert "from_cache" not in prepare(DataConfig(path=str(instruction_file), val_size=0.25, template="qa"), tiny_tokenizer).stats
    with open(instruction_file, "a", encoding="utf-8") as f:
        f.write('{"instruction": "one more", "output": "row"}\n')
    changed = prepare(cfg, tiny_tokenizer)
    assert "from_cache" not in changed.stats
    assert changed.stats["records"] == 41
    # a damaged entry is rebuilt, not trusted
    from tunesmith.data import cache
    for entry in cache.cache_dir().iterdir():
        (entry / "train.npz").write_bytes(b"torn")
    assert prepare(cfg, tiny_tokenizer).stats["records"] == 41
    assert "from_cache" in prepare(cfg, tiny_tokenizer).stats
    assert "from_cache" not in prepare(DataConfig(path=str(instruction_file), val_size=0.25, cache=False), tiny_tokenizer).stats


def test_tokenizing_is_not_padded_by_what_an_earlier_batch_left_on_the_tokenizer(tiny_tokenizer):
    """A left-padded generation batch (`tokenizer(..., padding=True)`) leaves padding switched on in the Rust
    tokenizer; sequence distillation then tokenized the teacher's answers left-padded to the longest."""
    from tunesmith.data.render import Rendered, tokenize

    texts = ["Return the sum.", "Open a file and read it, then return the sum of two numbers."]
    rendered = [Rendered(t, [(0, len(t))], "", t) for t in texts]
    plain = [t.input_ids.tolist() for t in tokenize(rendered, tiny_tokenizer, "chat", 256, "drop")]
    side = tiny_tokenizer.padding_side
    tiny_tokenizer.padding_side = "left"
    tiny_tokenizer(texts, padding=True, truncation=True, max_length=8)
    tiny_tokenizer.padding_side = side
    again = [t.input_ids.tolist() for t in tokenize(rendered, tiny_tokenizer, "chat", 256, "drop")]
    assert again == plain and len(plain[0]) < len(plain[1])
