"""What the product shows of a task's run comes from the task's declaration (catalog.TaskShows): a toy task, declared
in tests/toy_objective.py and registered with one line (the `toy` fixture), is described as it declares by
`tunesmith plan`, report.html (verdict, metrics table, charts), `tunesmith compare`, `tunesmith eval`, the closing
evaluation's choice of the best checkpoint and the studio's runs table, with no other edit. And the misses the declarations fixed stay fixed: a
DPO run's report names its preference loss, the studio's runs table shows a DPO run's preference accuracy, and `plan`
of a classifier estimates its head, not a vocabulary's."""
import dataclasses
import json

import pytest
import torch

import toy_objective
from conftest import write_jsonl
from test_train import tiny_cfg
from tunesmith.catalog import EVALUATIONS, TASKS, task_shows_json
from tunesmith.evaluate import report
from tunesmith.evaluate.closing import improves
from tunesmith.evaluate.compare import _row, to_markdown


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(TASKS, "toy", toy_objective.TASK)  # the one registry line
    return toy_objective.TASK


def test_every_task_declares_what_it_shows():
    for name, spec in TASKS.items():
        s = spec.shows
        assert s.evaluates in EVALUATIONS, name
        assert s.headline in spec.metrics, name  # a held-out metric the objective measures (tests/test_objectives.py)
        assert (s.headline in spec.lower_is_better) == (not s.higher_is_better), name
        assert s.charts and all(c.curves for c in s.charts), name
        shown = task_shows_json(name)
        assert json.loads(json.dumps(shown)) == shown and shown["headline"] == s.headline
    assert task_shows_json("no such task") is None


def _run_folder(folder, task: str, before: dict, after: dict, evals: list[dict]):
    """A finished run's files as training writes them (eval.json, metrics.jsonl, config.yaml, final/)."""
    (folder / "final").mkdir(parents=True)
    (folder / "config.yaml").write_text("task: auto\n")
    summary = {"state": "finished", "task": task, "method": "lora", "model": "tiny", "before": before, "after": after,
               "params": {"trainable": 10, "total": 100, "percent": 10.0}, "steps": 4, "tokens": 64,
               "train_seconds": 1.0, "tok_s": 64.0, "wall_seconds": 2.0, "threads": 1, "dtype": "float32",
               "data": {"format": "instruction", "records": 8, "val": {"kept": 2},
                        "train": {"kept": 6, "tokens": 64, "label_share": 0.5, "dropped_overlong": 0}}}
    (folder / "eval.json").write_text(json.dumps(summary))
    steps = [{"step": i, "loss": 2.0 - i / 4, "lr": 1e-3, "tok_s": 64.0} for i in range(1, 5)]
    write_jsonl(folder / "metrics.jsonl", [{"step": 0, **before}, *steps[:2], {"step": 2, **evals[0]}, *steps[2:],
                                           {"step": 4, **after}])
    return folder


def _drawn(monkeypatch) -> list:
    """(label, values) of every line report.html's charts draw."""
    lines, draw = [], report._draw

    def spy(ax, curve, x, y, label, several):
        lines.append((label, list(y)))
        return draw(ax, curve, x, y, label, several)

    monkeypatch.setattr(report, "_draw", spy)
    return lines


def test_the_report_describes_the_toy_as_it_declares(tmp_path, toy, monkeypatch):
    lines = _drawn(monkeypatch)
    before, after = {"eval_toy_error": 0.5, "eval_loss": 2.0}, {"eval_toy_error": 0.3, "eval_loss": 1.5}
    run = _run_folder(tmp_path / "toy", "toy", before, after, [{"eval_toy_error": 0.4, "eval_loss": 1.8}])
    page = report.write_report(run).read_text()
    assert "<b>The fine-tune helped.</b> held-out toy error 50.0% &rarr; <b>30.0%</b> (loss 2.000 &rarr; 1.500; a toy)" in page
    row = page.split("held-out toy_error</td>")[1].split("</tr>")[0]
    assert report.GOOD in row  # it fell, which the toy declares better
    assert ("held-out toy error", [0.5, 0.4, 0.3]) in lines  # its declared chart, from metrics.jsonl
    assert (run / "training.png").exists() and not (run / "rl.png").exists()

    worse = _run_folder(tmp_path / "worse", "toy", before, {"eval_toy_error": 0.6, "eval_loss": 1.5}, [before])
    page = report.write_report(worse).read_text()
    assert "<b>The fine-tune did not clearly help.</b> held-out toy error 50.0% &rarr; <b>60.0%</b>" in page
    assert report.BAD in page.split("held-out toy_error</td>")[1].split("</tr>")[0]


def test_a_dpo_report_names_its_preference_loss(tmp_path, monkeypatch):
    lines = _drawn(monkeypatch)
    before = {"eval_loss": 0.6931, "eval_reward_accuracy": 0.5}
    after = {"eval_loss": 0.5, "eval_reward_accuracy": 0.8}
    page = report.write_report(_run_folder(tmp_path / "dpo", "dpo", before, after, [before])).read_text()
    assert ("held-out preference loss 0.693 &rarr; <b>0.500</b> (-28%; reward accuracy 0.500 &rarr; 0.800)" in page)
    assert "on the responses" not in page  # (was: "held-out loss on the responses")
    assert ("held-out preference loss", [0.6931, 0.6931, 0.5]) in lines


def test_compare_tabulates_the_toy_as_it_declares(tmp_path, toy):
    run = _run_folder(tmp_path / "lora", "toy", {"eval_toy_error": 0.5, "eval_loss": 2.0},
                      {"eval_toy_error": 0.3, "eval_loss": 1.5}, [{"eval_toy_error": 0.4}])
    row = _row("lora", run, 1.0, 2 ** 30)
    assert row["task"] == "toy" and row["task metric"] == pytest.approx(30.0) and row["base metric"] == pytest.approx(50.0)
    assert row["held-out loss"] == 1.5
    table = to_markdown([row])
    assert "| untrained base | - | 50.000 |" in table and "task metric: held-out toy error (%), lower is better.\n" in table


def test_the_best_checkpoint_follows_the_declared_direction(toy):
    assert improves("eval_toy_error", {"eval_toy_error": 0.2}, {"value": 0.3}, "toy")
    assert not improves("eval_toy_error", {"eval_toy_error": 0.4}, {"value": 0.3}, "toy")
    assert improves("eval_toy_error", {"eval_toy_error": 0.2}, {"value": 0.3})  # no task named: as the tasks declare it
    assert improves("eval_reward", {"eval_reward": 0.4}, {"value": 0.3}, "rl")
    assert improves("eval_loss", {"eval_loss": 0.4}, {"value": 0.5}, "causal")


def test_the_toy_objective_is_built_from_its_registry_line_and_measures_its_headline(tmp_path, tiny_model_dir,
                                                                                       instruction_file, toy):
    from tunesmith.assemble import assemble
    from tunesmith.objectives import generates, objective_for

    cfg = tiny_cfg(tmp_path, tiny_model_dir, instruction_file)
    run = assemble(cfg, torch.device("cpu"))
    objective = objective_for("toy", cfg, run.data, run.tokenizer, run.precision.dtype)
    assert isinstance(objective, toy_objective.Toy) and generates("toy")
    m = objective.measure(run.model, objective.val)
    assert 0 <= m[toy.shows.headline] <= 1 and m["eval_toy_error"] == pytest.approx(1 - m["eval_token_accuracy"], abs=1e-5)


def test_eval_measures_what_the_toy_declares(tmp_path, tiny_model_dir, instruction_file, toy, monkeypatch):
    from tunesmith.data.prepare import load_examples
    from tunesmith.evaluate.evaluation import measure
    from tunesmith.models import load_tokenizer

    cfg = tiny_cfg(tmp_path, tiny_model_dir, instruction_file)
    _, examples, _ = load_examples(cfg.data, str(instruction_file))
    args = ({"tuned": tiny_model_dir}, examples[:2], load_tokenizer(tiny_model_dir), cfg, torch.float32, torch.device("cpu"))
    result = measure("toy", *args, show=2, log=lambda *a: None)  # "generation": ROUGE against the references
    assert "rougeL" in result["metrics"]["tuned"] and len(result["side_by_side"]) == 2
    assert "reward" not in result["metrics"]["tuned"]
    declared = dataclasses.replace(toy, shows=dataclasses.replace(toy.shows, evaluates="rewarded generation"))
    monkeypatch.setitem(TASKS, "toy", declared)  # declared otherwise, eval measures otherwise: the answers' rewards too
    cfg = tiny_cfg(tmp_path, tiny_model_dir, instruction_file, "task=rl", "rl.max_new_tokens=6",
                   "rl.rewards=[{kind: length, min_words: 1, max_words: 5}]")
    result = measure("toy", *args[:3], cfg, *args[4:], show=2, log=lambda *a: None)
    assert {"rougeL", "reward", "reward_length"} <= set(result["metrics"]["tuned"])


def test_plan_estimates_the_head_the_task_declares(tmp_path, tiny_model_dir, tiny_bert_dir, instruction_file,
                                                   sentiment_file, toy):
    from tunesmith.assemble import assemble
    from tunesmith.train.plan import estimate

    cpu = torch.device("cpu")
    cfg = tiny_cfg(tmp_path, tiny_bert_dir, sentiment_file)
    run = assemble(cfg, cpu)
    for task in (run.task, None):  # `tunesmith plan` names the task; train's own pre-flight check reads it from the data
        plan = estimate(cfg, run.model, run.params["trainable"], run.data.stats, 10, task=task)
        assert "classifier head" in plan.parts and "vocabulary head" not in plan.parts  # (was: a vocabulary head)
        assert plan.parts["classifier head"] < 1e4
    cfg = tiny_cfg(tmp_path, tiny_model_dir, instruction_file)
    run = assemble(cfg, cpu)
    causal = estimate(cfg, run.model, run.params["trainable"], run.data.stats, 10)
    toy_plan = estimate(cfg, run.model, run.params["trainable"], run.data.stats, 10, task="toy")
    assert "vocabulary head" in causal.parts and "classifier head" in toy_plan.parts
    assert toy_plan.flops_per_token < causal.flops_per_token  # no vocabulary head on the labelled tokens


def test_the_studio_runs_table_shows_the_toy_as_it_declares(tmp_path, toy):
    from tunesmith.run import RunDir
    from tunesmith.studio.runs import run_row

    run = _run_folder(tmp_path / "toy", "toy", {"eval_toy_error": 0.5, "eval_loss": 2.0},
                      {"eval_toy_error": 0.3, "eval_loss": 1.5}, [{"eval_toy_error": 0.4}])
    row = run_row("toy", RunDir(run), None)
    assert row["task"] == "toy" and row["status"] == "succeeded"
    assert (row["metric"], row["before"], row["value"]) == ("eval_toy_error", 0.5, 0.3)
    assert row["metric_label"] == "held-out toy error" and row["higher_is_better"] is False and row["percent"] is True


def test_the_studio_runs_table_shows_a_dpo_run_by_its_preference_accuracy(tmp_path):
    from tunesmith.run import RunDir
    from tunesmith.studio.runs import run_row

    before, after = {"eval_loss": 0.6931, "eval_reward_accuracy": 0.5}, {"eval_loss": 0.5, "eval_reward_accuracy": 0.8}
    row = run_row("dpo", RunDir(_run_folder(tmp_path / "dpo", "dpo", before, after, [before])), None)
    assert (row["metric"], row["value"]) == ("eval_reward_accuracy", 0.8)  # (was: looked for eval_pref_accuracy)
    assert row["metric_label"] == "held-out preference accuracy" and row["higher_is_better"] is True
