"""Judgements are training data: a run's blind A/B judgements (the studio's judgements.jsonl) read as preference pairs
(winner chosen, loser rejected, ties dropped), shown by `tunesmith data inspect`, and trained on from the CLI with
task=dpo and task=reward; the child records its parent and the judgements it learned from."""
import json
import random

import pytest

from conftest import write_jsonl
from tunesmith.cli.main import main
from tunesmith.config import load_config
from tunesmith.data.judgements import is_judgements_file, read_judgements
from tunesmith.data.prepare import heldout_prompts, load_examples, split_examples
from tunesmith.errors import TunesmithError
from tunesmith.run.layout import RunDir, trained_from

SYSTEM = "Answer in one short sentence."


def studio_judgement(session: int, index: int, pair: dict, a: str, b: str, answer_a: str, answer_b: str, winner: str,
                     shown_first: str) -> dict:
    """One line as the studio's POST /v1/studio/runs/{name}/judge/{index} appends it (studio/ui.py)."""
    return {"session": session, "index": index, "prompt": pair["messages"], "reference": pair["reference"], "a": a, "b": b,
            "answer_a": answer_a, "answer_b": answer_b, "winner": winner, "shown_first": shown_first, "at": 1_700_000_000 + index}


def shorter_wins(answer_a: str, answer_b: str) -> str:
    """The scripted judge: the shorter answer is better; the same length is a tie."""
    if len(answer_a) == len(answer_b):
        return "tie"
    return "a" if len(answer_a) < len(answer_b) else "b"


def judge_held_out_prompts(run: RunDir, n: int) -> list[dict]:
    """A session of blind judgements on the run's held-out prompts, as the studio makes one: the prompts from
    data.prepare.heldout_prompts, two answers per prompt (a terse one and a padded one, in random order; every fifth
    pair two answers of the same length), the scripted judge's verdicts."""
    rng = random.Random(0)
    rows = []
    for i, pair in enumerate(heldout_prompts(load_config(str(run.config)).data, n)):
        terse, padded = pair["reference"], pair["reference"] + " It also writes a long note about everything it did."
        if i % 5 == 4:
            padded = terse[::-1]  # same length: a tie
        first = rng.choice("ab")
        answer_a, answer_b = (terse, padded) if rng.random() < 0.5 else (padded, terse)
        rows.append(studio_judgement(7, i, pair, "tiny-base", run.name, answer_a, answer_b,
                                     shorter_wins(answer_a, answer_b), first))
    return rows


@pytest.fixture
def parent(tmp_path, tiny_model_dir, instruction_file):
    """A tiny supervised run with a system prompt, trained from the CLI, and 20 judgements of it (4 ties) followed by
    a line torn by a crash mid-write."""
    runs = tmp_path / "runs"
    assert main(["train", f"model.name={tiny_model_dir}", f"data.path={instruction_file}", "data.val_size=20",
                 f"data.system_prompt={SYSTEM}", "train.max_steps=2", "train.micro_batch_size=4", "eval.max_examples=4",
                 "eval.samples=0", f"output.dir={runs}", "output.name=parent"]) == 0
    run = RunDir(runs / "parent")
    rows = judge_held_out_prompts(run, 20)
    assert len(rows) == 20 and sum(r["winner"] == "tie" for r in rows) == 4
    assert {r["winner"] for r in rows} == {"a", "b", "tie"}
    write_jsonl(run.judgements, rows)
    with open(run.judgements, "a") as fh:
        fh.write('{"session": 7, "index": 20, "prompt": [{"role": "us')
    return run


def test_cli_inspects_judgements_and_trains_dpo_and_reward_children_that_record_their_parent(parent, tmp_path, capsys,
                                                                                             tiny_model_dir):
    judged = parent.judgements
    assert main(["data", "inspect", str(judged), f"model.name={parent}", "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert "format: preference (detected)" in out and "records: 16" in out
    assert "21 judgements -> 16 preference pairs" in out and "dropped 4 ties, 1 unusable line" in out
    ties = [f"{judged}:{n}" for n in (5, 10, 15, 20)]
    assert f"ties (dropped): {', '.join(ties)}" in out
    assert f"unusable (dropped): {judged}:21: not valid JSON (Unterminated string" in out
    assert f"data.system_prompt={SYSTEM!r}" in out  # the judged run's, taken from its config.yaml
    assert f"as read:  '<|im_start|>system\\n{SYSTEM}<|im_end|>\\n<|im_start|>user\\n" in out
    first = json.loads(judged.read_text().splitlines()[0])
    shorter, longer = sorted((first["answer_a"], first["answer_b"]), key=len)
    assert f"chosen:   {shorter}\n  rejected: {longer}" in out

    runs = tmp_path / "runs"
    common = [f"model.name={parent}", f"data.path={judged}", "data.val_size=4", "train.micro_batch_size=4",
              "eval.max_examples=4", "eval.samples=0", f"output.dir={runs}"]
    assert main(["train", "task=dpo", *common, "train.max_steps=12", "train.lr=1e-2", "dpo.beta=0.5", "output.name=v1"]) == 0
    child = RunDir(runs / "v1")
    assert f"judgements: {judged}: 21 judgements -> 16 pairs; dropped 4 ties, 0 between identical answers, 1 unusable" \
        in child.log.read_text()
    summary = json.loads(child.summary.read_text())
    assert summary["task"] == "dpo" and summary["data"]["records"] == 16
    assert summary["after"]["eval_reward_accuracy"] > summary["before"]["eval_reward_accuracy"] == 0.5
    cfg = load_config(str(child.config))
    assert (cfg.model.name, cfg.data.path, cfg.data.system_prompt) == (str(parent), str(judged), SYSTEM)
    lineage = trained_from(child)
    assert lineage.parent.path.resolve() == parent.path.resolve() and lineage.judgements.resolve() == judged.resolve()
    # the child is served as the judged run was: with its system prompt
    assert json.loads((child.final / "tunesmith_prompt.json").read_text())["system_prompt"] == SYSTEM
    assert trained_from(parent).parent is None and trained_from(parent).judgements is None

    # a reward model on the same judgements, from the base (InstructGPT's reward model is not the policy)
    assert main(["train", "task=reward", *common, f"model.name={tiny_model_dir}", "train.max_steps=4", "train.lr=1e-3",
                 "output.name=rm"]) == 0
    reward = RunDir(runs / "rm")
    summary = json.loads(reward.summary.read_text())
    assert summary["task"] == "reward" and summary["data"]["records"] == 16
    assert load_config(str(reward.config)).data.system_prompt == SYSTEM
    assert trained_from(reward).parent is None and trained_from(reward).judgements.resolve() == judged.resolve()


def test_a_child_must_render_prompts_as_the_judged_run_did(parent):
    judged = parent.judgements
    with pytest.raises(TunesmithError, match=r"data.template: 'chat'.*this config has 'qa'"):
        load_config(None, [f"data.path={judged}", "data.template=qa"])
    with pytest.raises(TunesmithError, match=r"data.system_prompt: 'Answer in one short sentence.'.*'Be verbose.'"):
        load_config(None, [f"data.path={judged}", "data.system_prompt=Be verbose."])
    assert load_config(None, [f"data.path={judged}"]).data.system_prompt == SYSTEM


def judgement(prompt, answer_a: str, answer_b: str, winner: str) -> dict:
    return {"prompt": prompt, "a": "base", "b": "run", "answer_a": answer_a, "answer_b": answer_b, "winner": winner}


def test_ties_identical_answers_and_malformed_lines_are_dropped_with_file_and_line(tmp_path):
    hi = [{"role": "user", "content": "Say hi."}]
    lines = [json.dumps(judgement(hi, "hi", "hello there", "a")),                                # 1 pair
             json.dumps(judgement(hi, "hello there", "hi", "b")),                                # 2 pair, same prompt
             json.dumps(judgement("Say bye.", "bye", "goodbye", "tie")),                         # 3 tie
             "",                                                                                 # blank: skipped
             json.dumps(judgement([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Bye?"}],
                                  "farewell", "bye", "b")),                                      # 5 pair, with a system turn
             json.dumps(judgement(hi, "same", "same", "a")),                                     # 6 identical answers
             json.dumps(judgement(hi, "x", "y", "first")),                                       # 7 winner unknown
             json.dumps({**judgement(hi, "x", "y", "a"), "answer_b": None}),                     # 8 answer not text
             json.dumps(judgement([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "x", "y", "a")),
             json.dumps(judgement([{"role": "robot", "content": "Q"}], "x", "y", "a")),          # 10 bad role
             json.dumps({k: v for k, v in judgement(hi, "x", "y", "a").items() if k != "prompt"}),  # 11 no prompt
             "[1, 2]",                                                                           # 12 not an object
             '{"winner": "a", "answer_a": "x", "answer_b": NaN, "prompt": "Q"}',                 # 13 NaN
             '{"winner": "a", "answer_a": "x"']                                                  # 14 torn
    path = tmp_path / "exported-from-a-colleague.jsonl"  # not named as the studio names it: detected by its shape
    path.write_text("\n".join(lines) + "\n")
    assert is_judgements_file(path)
    got = read_judgements(path)
    assert got.judgements == 13
    assert [where for _, where in got.pairs] == [f"{path}:{n}" for n in (1, 2, 5)]
    assert [(f["chosen"], f["rejected"]) for f, _ in got.pairs] == [("hi", "hello there"), ("hi", "hello there"),
                                                                  ("bye", "farewell")]
    assert got.pairs[2][0]["prompt"][0] == {"role": "system", "content": "Be kind."}
    assert got.ties == [f"{path}:3"] and got.identical == [f"{path}:6"]
    why = dict(line.split(": ", 1) for line in got.unusable)
    assert list(why) == [f"{path}:{n}" for n in range(7, 15)]
    assert "'winner' is 'first'" in why[f"{path}:7"]
    assert "'answer_b' is NoneType" in why[f"{path}:8"]
    assert "ends with the assistant's turn" in why[f"{path}:9"]
    assert "'prompt'[0] is {\"role\": \"robot\"" in why[f"{path}:10"]
    assert "no 'prompt'" in why[f"{path}:11"]
    assert "expected a JSON object" in why[f"{path}:12"]
    assert "NaN" in why[f"{path}:13"] and "not valid JSON" in why[f"{path}:14"]

    # read as data: the pairs in preference format; both judgements of "Say hi." land on the same side of a split
    fmt, examples, counts = load_examples(load_config(None, [f"data.path={path}"]).data, str(path))
    assert fmt == "preference" and counts["records"] == 3
    assert examples[0].group == examples[1].group != examples[2].group
    for seed in range(5):
        train, val = split_examples(examples, 1, seed)
        assert sum(ex.group == examples[0].group for ex in val) in (0, 2)


def test_a_file_with_no_decided_pair_says_what_it_held(tmp_path):
    path = tmp_path / "judgements.jsonl"
    path.write_text(json.dumps(judgement("Q", "x", "y", "tie")) + "\n" + "{oops\n")
    with pytest.raises(TunesmithError, match=r"no preference pairs to learn from: .*2 judgements -> 0 preference pairs.*"
                                             r"1 tie, 1 unusable line \(first: .*judgements.jsonl:2: not valid JSON"):
        load_examples(load_config(None, [f"data.path={path}"]).data, str(path))
    path.write_text("\n")
    with pytest.raises(TunesmithError, match="no judgements"):
        load_examples(load_config(None, [f"data.path={path}"]).data, str(path))
    other = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q", "chosen": "x", "rejected": "y"}])
    assert not is_judgements_file(other)


def test_lineage_reads_relative_paths_from_the_folder_the_child_was_started_in(tmp_path, monkeypatch):
    work = tmp_path / "work"
    for name, cfg in (("parent", {"model": {"name": "smollm2-135m-instruct"}, "data": {"path": "builtin:docstrings"}}),
                      ("v1", {"model": {"name": "runs/parent"}, "data": {"path": "runs/parent/judgements.jsonl"},
                              "output": {"dir": "runs"}})):
        (work / "runs" / name).mkdir(parents=True)
        (work / "runs" / name / "config.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    (work / "runs" / "parent" / "judgements.jsonl").write_text("")
    monkeypatch.chdir(tmp_path)  # elsewhere: runs/parent does not exist here
    got = trained_from(RunDir("work/runs/v1"))
    assert got.parent.path == work / "runs" / "parent" and got.judgements == work / "runs" / "parent" / "judgements.jsonl"
    for run in ("work/runs/parent", "work/runs/nothing"):
        assert (trained_from(RunDir(run)).parent, trained_from(RunDir(run)).judgements) == (None, None)


def verdicts(a: str, b: str, winners: str) -> list[dict]:
    """Judgement lines of `a` vs `b`, one per letter of `winners` (a, b, or t for a tie)."""
    return [judgement(f"Question {i}?", f"answer {i} of {a}", f"answer {i} of {b}", {"t": "tie"}.get(w, w))
            | {"a": a, "b": b} for i, w in enumerate(winners)]


def fake_run(runs, name: str, model: str, data: str = "builtin:docstrings", judged: list[dict] = ()) -> RunDir:
    run = RunDir(runs / name)
    run.path.mkdir(parents=True)
    run.config.write_text(json.dumps({"model": {"name": model}, "data": {"path": data}, "output": {"dir": "runs"}}))
    if judged:
        write_jsonl(run.judgements, list(judged))
    return run


def test_lineage_from_the_base_with_each_generations_win_rate_over_its_parent(tmp_path, monkeypatch):
    from tunesmith.evaluate.lineage import lineage

    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    base = "smollm2-135m-instruct"
    fake_run(runs, "v0", base, judged=verdicts(base, "v0", "bbbbbbbbaat"))  # the studio's default pair: base vs run
    fake_run(runs, "v1", "runs/v0", "runs/v0/judgements.jsonl",
             judged=verdicts("runs/v0", "v1", "bbbbbbbbbbbbbbatt")    # as the studio names the parent: config's model.name
             + verdicts(base, "v1", "aaaa"))                          # v1 against the base: not its parent, not counted
    fake_run(runs, "v2", "runs/v1", "runs/v1/judgements.jsonl")
    with open(runs / "v1" / "judgements.jsonl", "a") as fh:           # v2 judged on v1's page, v2 shown as `a`
        fh.write("".join(json.dumps(r) + "\n" for r in verdicts("ft:v2-id", "v1", "aaab")))
        fh.write('{"a": "ft:v2-id", "b": "v1", "winner": "a", "ans')  # torn: skipped

    gens = lineage(runs / "v2", aliases={"ft:v2-id": runs / "v2"})
    assert [(g.name, g.parent) for g in gens] == [(base, None), ("v0", base), ("v1", "v0"), ("v2", "v1")]
    assert gens[0].run is None and gens[0].vs_parent is None and gens[1].judgements is None
    assert gens[2].judgements.resolve() == (runs / "v0" / "judgements.jsonl").resolve()
    v0, v1, v2 = (g.vs_parent for g in gens[1:])
    assert (v0.wins, v0.losses, v0.ties, v0.win_rate) == (8, 2, 1, 0.8)
    assert (v1.wins, v1.losses, v1.ties) == (14, 1, 2)
    assert v1.ci95 == pytest.approx((0.7018, 0.9881), abs=1e-3)   # Wilson 95 % for 14 / 15
    assert v1.p_sign_test == pytest.approx(2 * 16 / 2 ** 15)      # P(<= 1 loss of 15 | p = 1/2), both sides
    assert (v2.wins, v2.losses, v2.ties) == (3, 1, 0) and v2.p_sign_test == pytest.approx(0.625)
    # without the alias the studio's id for v2 names no run: no record against v1
    assert lineage(runs / "v2")[-1].vs_parent is None
    # a run that names itself (a loop) ends the chain
    assert [g.name for g in lineage(fake_run(runs, "loop", "runs/loop"))] == ["runs/loop", "loop"]


def test_unjudged_prompts_leave_out_every_prompt_a_judgement_used(tmp_path, instruction_file):
    from tunesmith.evaluate.lineage import unjudged_prompts

    data = load_config(None, [f"data.path={instruction_file}", "data.val_size=10"]).data
    held_out = heldout_prompts(data, 100)
    assert len(held_out) == 10
    judged = write_jsonl(tmp_path / "judgements.jsonl", [
        studio_judgement(1, i, p, "base", "run", "x", "y", "a", "a") for i, p in enumerate(held_out[:4])])
    fresh = unjudged_prompts(data, [judged, tmp_path / "none.jsonl"], 100)
    assert fresh == held_out[4:]
    assert unjudged_prompts(data, [judged], 2) == held_out[4:6]
