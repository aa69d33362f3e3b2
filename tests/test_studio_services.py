"""The studio's services and protocol without HTTP: the runs table's headline as each task declares it, the one
metrics-row mapping, the page's settings as a job request, the run index."""
import json
from pathlib import Path

import pytest

from tunesmith.catalog import TASKS
from tunesmith.run import RunDir
from tunesmith.studio.jobs import JobError, Policy
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


def _metrics_job(tmp_path, job_id="ftjob-r"):
    from tunesmith.studio.jobs import Runner

    store = Store(tmp_path / "studio.db")
    run = RunDir(tmp_path / "runs" / job_id)
    run.path.mkdir(parents=True)
    run.log.write_text("")
    store.add_job(job_id, {"model": "m", "training_file": "f", "_plan": {"task": "causal"}}, str(run.path), "running")
    return store, run, Runner(store, tmp_path)


def _append_steps(run, steps, launch):
    from tunesmith.run.files import append_jsonl

    for step in steps:  # a resumed launch trains its steps again: other numbers (its own clock) for the same step
        append_jsonl(run.metrics, {"step": step, "total_steps": 9, "loss": 2.0 - step / 10 - launch / 100,
                                   "elapsed": round(step * 0.37 + launch * 1.3, 2)})


def _steps(store, job_id="ftjob-r"):
    return [json.loads(e["data"])["step"] for e in store.events(job_id, limit=1000, newest_first=False)
            if e["type"] == "metrics"]


@pytest.mark.parametrize("again", [[3, 4, 5], [3, 4, 5, 6], [3, 4, 5, 6, 7]])
def test_a_resume_that_grows_metrics_back_between_two_polls_has_every_step_trained_again(tmp_path, again):
    """Steps 1-5 read; the run resumes from its checkpoint at step 2 (train/checkpoint.truncate_metrics rewrites the
    file to steps 1-2) and trains 3.. again, all between two polls: each step trained again is an event again, once
    (was: metrics.jsonl was followed by its line count, so a file as long or longer than before lost those steps)."""
    from tunesmith.studio.jobs import Runner
    from tunesmith.train.checkpoint import truncate_metrics

    store, run, runner = _metrics_job(tmp_path)
    _append_steps(run, range(1, 6), launch=0)
    runner._read_files("ftjob-r")
    assert _steps(store) == [1, 2, 3, 4, 5]
    truncate_metrics(run, 2)
    _append_steps(run, again, launch=1)
    runner._read_files("ftjob-r")
    assert _steps(store) == [1, 2, 3, 4, 5, *again]
    runner._read_files("ftjob-r")
    Runner(store, tmp_path)._read_files("ftjob-r")  # a restarted studio goes on from where the last one was
    _append_steps(run, [len(again) + 3], launch=1)
    Runner(store, tmp_path)._read_files("ftjob-r")
    assert _steps(store) == [1, 2, 3, 4, 5, *again, len(again) + 3]


def test_a_resume_from_past_what_was_read_emits_the_unread_steps_once(tmp_path):
    """Steps 1-2 read, 3-4 written and a checkpoint at 4, then a resume (the file rewritten to steps 1-4) trains 5:
    3, 4 and 5 are events once each; a half-written last line waits for its newline."""
    from tunesmith.train.checkpoint import truncate_metrics

    store, run, runner = _metrics_job(tmp_path)
    _append_steps(run, [1, 2], launch=0)
    runner._read_files("ftjob-r")
    _append_steps(run, [3, 4], launch=0)
    truncate_metrics(run, 4)
    _append_steps(run, [5], launch=1)
    with open(run.metrics, "a") as fh:
        fh.write('{"step": 6, "total_st')
    runner._read_files("ftjob-r")
    assert _steps(store) == [1, 2, 3, 4, 5]
    with open(run.metrics, "a") as fh:
        fh.write('eps": 9, "loss": 1.0}\n')
    runner._read_files("ftjob-r")
    assert _steps(store) == [1, 2, 3, 4, 5, 6]


def test_offsets_an_older_studio_committed_as_line_counts_go_on_from_that_line(tmp_path):
    store, run, _ = _metrics_job(tmp_path)
    run.log.write_text("a\n\nb\n")
    _append_steps(run, [1, 2, 3], launch=0)
    store.update_job("ftjob-r", offsets=json.dumps({"metrics": 2, "log": 1}))
    from tunesmith.studio.jobs import Runner

    Runner(store, tmp_path)._read_files("ftjob-r")
    assert _steps(store) == [3] and [e["message"] for e in store.events("ftjob-r", limit=9) if e["type"] == "message"] == ["b"]


def _verdict(k: int, winner: str) -> dict:
    prompt = [{"role": "user", "content": f"question {k}"}]
    return {"session": 1, "index": k, "prompt": prompt, "a": "base", "b": "v1", "answer_a": f"short {k}",
            "answer_b": f"a longer answer {k}", "winner": winner, "shown_first": "a", "at": 1_700_000_000 + k}


def test_a_child_trains_on_a_snapshot_of_its_parents_judgements_taken_when_it_is_made(tmp_path):
    """Train on these judgements: the child's data.path is a copy of the parent's judgements.jsonl as it was when the
    child was made, in the child job's own folder, so a resume after more judgements trains on the same pairs (was:
    the parent's live file); the lineage still knows the child learned from the parent's judgements."""
    from tunesmith.config import load_config
    from tunesmith.evaluate.lineage import lineage
    from tunesmith.studio import loop

    home = tmp_path / "home"
    parent = RunDir(home / "runs" / "v1")
    (parent.path / "final").mkdir(parents=True)
    parent.config.write_text("model:\n  name: base\ndata:\n  path: train.jsonl\n  system_prompt: 'Be: brief.'\n")
    parent.judgements.write_text("".join(json.dumps(_verdict(k, "a" if k % 2 else "b")) + "\n" for k in range(4))
                                 + '{"session": 1, "ind')  # a judgement being written as the child is made
    store = Store(home / "studio.db")
    req = loop.child_job("v1", parent, "dpo", store, home, Policy(home=home))
    data_path = next(o.split("=", 1)[1] for o in req["_plan"]["overrides"] if o.startswith("data.path="))
    snapshot = Path(data_path)
    assert snapshot != parent.judgements and snapshot.is_file()
    assert snapshot.parent == home / "jobs" / req["_id"] and snapshot.name == "judgements.jsonl"
    assert snapshot.read_text().count("\n") == 4 and req["metadata"]["pairs"] == "4"
    with pytest.raises(JobError, match="data.system_prompt"):  # prompts rendered otherwise than the judged run's
        loop.child_job("v1", parent, "dpo", store, home, Policy(home=home), overrides=["data.system_prompt=Other"])
    assert len(list((home / "jobs").iterdir())) == 1  # the refused child's snapshot is gone

    with open(parent.judgements, "a") as fh:  # more judgements after the child was made
        fh.write('ex": 9}\n' + "".join(json.dumps(_verdict(k, "a")) + "\n" for k in range(4, 9)))
    assert snapshot.read_text().count("\n") == 4  # what the child trains on, at every (re)start

    child = RunDir(home / "runs" / req["_id"])  # its run, as training records it
    child.path.mkdir()
    cfg = load_config(req["_plan"]["source"], req["_plan"]["overrides"])
    assert cfg.data.system_prompt == "Be: brief."  # its prompts rendered as the judged run rendered them
    child.config.write_text(f"model:\n  name: {cfg.model.name}\ndata:\n  path: {cfg.data.path}\n")
    store.add_job(req["_id"], req, str(child.path), "running")
    assert [g.judgements for g in lineage(child.path)][-1] == snapshot
    view = loop.lineage_view(child, {"v1": parent.path, req["_id"]: child.path}, store, Policy(home=home))
    assert view[-1]["learned_from"] == "judgements of v1" and view[-1]["judgements_of"] == "v1"


def test_a_reward_model_and_a_teacher_named_by_their_models_id_reach_the_job_as_absolute_paths(tmp_path, monkeypatch):
    """`--models DIR` and a reward model (or teacher) named by its id inside DIR: the job's command names it by its
    absolute path, as found at start-up (was: `rm` went to the job as it was, and the job, which runs in the studio
    home, looked for HOME/rm); a Studio given a relative folder resolves it against the directory it was started in."""
    from tunesmith.config import load_config
    from tunesmith.studio.app import Studio, build_studio
    from tunesmith.studio.jobs import plan_job

    monkeypatch.chdir(tmp_path)
    for name in ("rm", "teacher"):
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / "config.json").write_text("{}")
    app = build_studio(Studio(tmp_path / "home", models_dirs=(Path("models"),), data_roots=(Path("."),)))
    policy = app.state.policy
    assert policy.models_dirs == ((tmp_path / "models").resolve(),) and policy.data_roots == (tmp_path.resolve(),)
    monkeypatch.chdir(tmp_path / "home")  # where jobs run
    rl = {"model": "m", "tunesmith": {"overrides": ["task=rl", 'rl.rewards=[{"kind": "model", "path": "rm"}]']}}
    plan = plan_job(rl, "smollm2-135m", "m", tmp_path / "train.jsonl", None, policy)
    assert load_config(plan.source, plan.overrides).rl.rewards[0].path == str((tmp_path / "models" / "rm").resolve())
    distill = {"model": "m", "tunesmith": {"overrides": ["distill.teacher=teacher"]}}
    plan = plan_job(distill, "smollm2-135m", "m", tmp_path / "train.jsonl", None, policy)
    assert load_config(plan.source, plan.overrides).distill.teacher == str((tmp_path / "models" / "teacher").resolve())
