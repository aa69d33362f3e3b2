"""The studio's services and protocol without HTTP: the runs table's headline as each task declares it, the one
metrics-row mapping, the page's settings as a job request, the run index."""
import json

import pytest

from tunesmith.catalog import TASKS
from tunesmith.run import RunDir
from tunesmith.studio.jobs import Policy
from tunesmith.studio.protocol import JobRequest, Settings, metrics_event
from tunesmith.studio.runs import RunIndex, headline, run_row
from tunesmith.studio.store import Store


@pytest.mark.parametrize("task", sorted(TASKS))
def test_the_runs_table_shows_the_headline_each_task_declares(task):
    shows = TASKS[task].shows
    summary = {"before": {"eval_loss": 2.0, shows.headline: 0.25}, "after": {"eval_loss": 1.5, shows.headline: 0.75}}
    row = headline(task, summary)
    assert (row["metric"], row["before"], row["value"]) == (shows.headline, 0.25, 0.75)
    assert (row["metric_label"], row["higher_is_better"], row["percent"]) == (shows.label, shows.higher_is_better,
                                                                              shows.percent)


def test_a_dpo_run_is_headed_by_its_preference_accuracy_not_its_loss():
    # the live miss of issue 51: the table looked for eval_pref_accuracy, which no objective emits
    row = headline("dpo", {"after": {"eval_loss": 0.61, "eval_reward_accuracy": 0.8}})
    assert row["metric"] == "eval_reward_accuracy" and row["higher_is_better"] is True


def test_without_its_headline_a_run_shows_its_held_out_loss_or_nothing():
    assert headline("classification", {"after": {"eval_loss": 0.4}})["metric"] == "eval_loss"
    assert headline("?", {"after": {"eval_loss": 0.4}})["higher_is_better"] is False
    assert headline("causal", {})["metric"] is None


def test_a_metrics_row_becomes_an_event_with_openai_names():
    row = {"step": 3, "total_steps": 10, "loss": 2.5, "lr": 1e-3, "tok_s": 900.0, "tokens": 64, "elapsed": 1.5,
           "epoch": 0, "eval_accuracy": 0.5, "reward": 0.25, "threads": 2}
    data = metrics_event(row)
    assert data == {"step": 3, "total_steps": 10, "train_loss": 2.5, "learning_rate": 1e-3, "tokens": 64,
                    "tokens_per_second": 900.0, "elapsed": 1.5, "epoch": 0, "eval_accuracy": 0.5, "reward": 0.25}
    assert metrics_event({"step": 4, "eval_loss": 2.0}) == {"step": 4, "valid_loss": 2.0}


def test_the_pages_settings_are_a_valid_job_request():
    s = Settings(model="m", training_file="file-1", validation_file="file-2", recipe="r", method="dpo",
                 overrides=["method.name=lora"], hyperparameters={"n_epochs": 2})
    req = JobRequest.model_validate(s.job_request())
    assert (req.method.type, req.tunesmith.overrides, req.validation_file) == ("dpo", ["method.name=lora"], "file-2")


def test_the_run_index_finds_runs_and_the_studio_home_wins(tmp_path):
    home, other = tmp_path / "home", tmp_path / "cli-runs"
    for folder, name in ((home / "runs", "a"), (other, "a"), (other, "b")):
        (folder / name).mkdir(parents=True)
        (folder / name / "config.yaml").write_text("model:\n  name: nowhere\n")
    store = Store(tmp_path / "studio.db")
    try:
        index = RunIndex(home, (other,), store, Policy())
        assert index.folders() == {"a": home / "runs" / "a", "b": other / "b"}
        assert index.find("missing") is None
        (other / "b" / "eval.json").write_text(json.dumps({"task": "rl", "after": {"eval_reward": 0.5}}))
        row = run_row("b", RunDir(other / "b"), None)
        assert (row["status"], row["metric"], row["metric_label"]) == ("incomplete", "eval_reward", "held-out reward")
        assert index.served_runs() == {}  # neither has finished (no final/)
    finally:
        store.close()


def test_a_queued_jobs_row_has_its_task_before_its_run_folder_exists(tmp_path):
    job = {"id": "ftjob-1", "status": "queued", "fine_tuned_model": None, "created_at": 5,
           "request": json.dumps({"_plan": {"task": "dpo", "base": "tiny"}})}
    row = run_row("ftjob-1", RunDir(tmp_path / "runs" / "ftjob-1"), job)
    assert (row["task"], row["base"], row["status"], row["created_at"]) == ("dpo", "tiny", "queued", 5)
    # task auto: the task its training file decided when the job was created (submit.resolved_task), config or not
    job["request"] = json.dumps({"_plan": {"task": "auto", "base": "tiny"}, "_task": "classification"})
    (tmp_path / "runs" / "ftjob-1").mkdir(parents=True)
    (tmp_path / "runs" / "ftjob-1" / "config.yaml").write_text("task: auto\nmodel:\n  name: nowhere\n")
    assert run_row("ftjob-1", RunDir(tmp_path / "runs" / "ftjob-1"), job)["task"] == "classification"


def test_a_job_with_task_auto_resolves_it_from_its_training_files_format(tmp_path):
    from tunesmith.studio.submit import resolved_task

    store = Store(tmp_path / "studio.db")
    try:
        store.add_file({"id": "file-1", "filename": "x.jsonl", "purpose": "fine-tune", "bytes": 1, "created_at": 0,
                        "status": "processed", "status_details": None, "stored": "file-1.jsonl",
                        "format": "preference", "records": 3})
        assert resolved_task(store, "auto", "file-1") == "dpo"
        assert resolved_task(store, "reward", "file-1") == "reward"
    finally:
        store.close()
