"""Nothing deleted, nothing lost (issue 31): run names are one folder name; --overwrite replaces only what tunesmith made,
and only once the new run is trained; the trained weights are saved before the closing evaluation, which a signal or
a crash leaves for `tunesmith eval` to complete; one writer per run; nothing unpickled on load; a full disk costs a
checkpoint, never the run."""
import json
import os
import pickle
import resource
import signal
import subprocess
import sys

import pytest

from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.evaluate.evaluation import evaluate_run
from tunesmith.run import RunDir
from tunesmith.run.lock import RunLock
from tunesmith.train import checkpoint
from tunesmith.train.interrupt import TrainingInterrupted
from tunesmith.train.loop import train
from conftest import write_jsonl
from test_train import tiny_cfg


# -- 1. paths --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["..", ".", "/tmp/elsewhere", "a/b", "a\\b", "", "tab\there"])
def test_a_run_name_is_one_folder_name(name):
    with pytest.raises(TunesmithError, match="config key 'output.name' has value .*a run name is one folder name"):
        load_config(None, [f"output.name={json.dumps(name)}"])


def test_a_recipe_cannot_ask_to_replace_a_run(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("output: {name: x, overwrite: true}\n")
    with pytest.raises(TunesmithError, match="output.overwrite' is not read from a recipe: .* --overwrite"):
        load_config(str(recipe))
    recipe.write_text("output: {name: x, overwrite: false}\n")  # what older runs' config.yaml hold: read as before
    assert load_config(str(recipe)).output.name == "x"


def test_overwrite_never_replaces_a_folder_tunesmith_did_not_make(tmp_path, tiny_model_dir, instruction_file):
    mine = tmp_path / "runs" / "mine"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("my work")
    with pytest.raises(TunesmithError, match="not a run folder tunesmith created"):
        train(tiny_cfg(tmp_path, tiny_model_dir, instruction_file, "output.name=mine"), overwrite=True)
    assert (mine / "notes.txt").read_text() == "my work" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_overwrite_keeps_the_old_run_until_the_new_one_is_trained(tmp_path, tiny_model_dir, instruction_file, monkeypatch):
    cfg = tiny_cfg(tmp_path, tiny_model_dir, instruction_file, "train.max_steps=3")
    run = train(cfg).run_dir
    (run / "sentinel").write_text("the first run")
    from tunesmith.objectives.sft import SFT

    def fail(*a, **kw):
        raise RuntimeError("the new run fails mid-way")

    monkeypatch.setattr(SFT, "loss", fail)
    with pytest.raises(RuntimeError, match="mid-way"):
        train(cfg, overwrite=True)
    kept = list((tmp_path / "runs").glob(".t.replaced-*"))
    assert len(kept) == 1 and (kept[0] / "sentinel").read_text() == "the first run"  # recoverable
    monkeypatch.undo()
    (tmp_path / "runs" / "t" / ".tunesmith-run").unlink()  # the failed run's folder is not replaced without its marker
    with pytest.raises(TunesmithError, match="not a run folder tunesmith created"):
        train(cfg, overwrite=True)
    (tmp_path / "runs" / "t" / ".tunesmith-run").write_text("{}")
    res = train(cfg, overwrite=True)
    assert not (res.run_dir / "sentinel").exists() and (res.run_dir / "final").is_dir()
    assert [p for p in (tmp_path / "runs").iterdir() if p.name.startswith(".t.replaced-")] == kept  # only the new one's


# -- 2. the end of a run --------------------------------------------------------------------------------------------

def _pairs(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Say {i}.", "chosen": f"{i} {i}.", "rejected": f"no {i + 3}."}
                                                  for i in range(24)])


def _task_data(task, tmp_path, tiny_model_dir, tiny_bert_dir, instruction_file, sentiment_file):
    return {"causal": (tiny_model_dir, instruction_file, []),
            "classification": (tiny_bert_dir, sentiment_file, []),
            "dpo": (tiny_model_dir, _pairs(tmp_path), []),
            "distillation": (tiny_model_dir, instruction_file, [f"distill.teacher={tiny_model_dir}"])}[task]


@pytest.mark.parametrize("task", ["causal", "classification", "dpo", "distillation"])
def test_a_signal_during_the_closing_evaluation_leaves_a_trained_run_that_eval_completes(
        task, tmp_path, tiny_model_dir, tiny_bert_dir, instruction_file, sentiment_file, monkeypatch):
    from tunesmith.train import loop

    model_dir, data, extra = _task_data(task, tmp_path, tiny_model_dir, tiny_bert_dir, instruction_file, sentiment_file)
    cfg = tiny_cfg(tmp_path, model_dir, data, "train.max_steps=4", *extra)
    real_close = loop.close

    def sigterm_then_close(*a, **kw):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives as the closing evaluation starts
        return real_close(*a, **kw)

    monkeypatch.setattr(loop, "close", sigterm_then_close)
    with pytest.raises(TrainingInterrupted, match="stopped during the closing evaluation; the trained model is saved") as e:
        train(cfg)
    run = RunDir(tmp_path / "runs" / "t")
    assert e.value.resume_command == f"tunesmith eval {run}" and e.value.next_step == "complete it with"
    assert run.final.is_dir() and json.loads(run.summary.read_text())["state"] == "trained"
    with pytest.raises(TunesmithError, match="is trained .* complete it with tunesmith eval"):
        train(cfg, resume=run.path)  # resume says what to do instead
    monkeypatch.undo()
    evaluate_run(run.path, n=4, log=lambda *_: None)
    summary = json.loads(run.summary.read_text())
    assert summary["state"] == "finished" and summary["after"]["eval_loss"] > 0 and run.report.exists()
    assert summary["after"]["eval_loss"] != summary["before"]["eval_loss"]


def test_a_crash_during_the_closing_evaluation_keeps_the_trained_model(tmp_path, tiny_model_dir, instruction_file, monkeypatch):
    from tunesmith.evaluate import forgetting

    def broken(*a, **kw):
        raise RuntimeError("out of memory in the forgetting check")

    monkeypatch.setattr(forgetting, "compare_to_base", broken)
    with pytest.raises(TunesmithError, match=r"closing evaluation failed .*out of memory.* saved in .*final: complete the "
                                             r"evaluation with tunesmith eval"):
        train(tiny_cfg(tmp_path, tiny_model_dir, instruction_file, "train.max_steps=3"))
    assert (tmp_path / "runs" / "t" / "final" / "adapter_model.safetensors").exists()


def test_a_signal_in_the_last_step_saves_the_model_and_skips_the_evaluation(tmp_path, tiny_model_dir, instruction_file,
                                                                            monkeypatch):
    from tunesmith.objectives.sft import SFT

    real, calls = SFT.loss, []

    def loss_then_signal(*a, **kw):
        calls.append(1)
        if len(calls) == 3:  # the last step's pass
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **kw)

    monkeypatch.setattr(SFT, "loss", loss_then_signal)
    with pytest.raises(TrainingInterrupted, match="closing evaluation"):
        train(tiny_cfg(tmp_path, tiny_model_dir, instruction_file, "train.max_steps=3"))
    run = RunDir(tmp_path / "runs" / "t")
    assert run.final.is_dir() and json.loads(run.summary.read_text())["state"] == "trained"


# -- 3. one writer per run -------------------------------------------------------------------------------------------

def test_a_run_being_written_is_not_resumed_replaced_or_auto_resumed(tmp_path, tiny_model_dir, instruction_file):
    cfg = tiny_cfg(tmp_path, tiny_model_dir, instruction_file, "train.max_steps=4", "train.save_every_steps=2")
    run = train(cfg).run_dir
    import shutil
    shutil.rmtree(run / "final")  # as if it had stopped after its last checkpoint
    with RunLock(run).acquire("training"):  # a live process writing it
        for attempt in (lambda: train(cfg, resume=run), lambda: train(cfg, overwrite=True),
                        lambda: train(cfg.model_copy(update={"output": cfg.output.model_copy(update={"resume": "auto"})}))):
            with pytest.raises(TunesmithError, match=rf"{run} is in use: training by process {os.getpid()} on .* one writer"):
                attempt()
    assert train(cfg, resume=run).summary["resumed_from"] == 2  # the lock is free again: resumed from the last checkpoint
    assert (run / "final").is_dir()


def test_output_resume_auto_restarts_a_run_stopped_before_its_first_checkpoint(tmp_path, tiny_model_dir, instruction_file):
    cfg = tiny_cfg(tmp_path, tiny_model_dir, instruction_file, "train.max_steps=3", "output.resume=auto")
    run = train(cfg).run_dir
    import shutil
    shutil.rmtree(run / "final")  # preempted before any checkpoint: nothing to resume, the folder is ours
    res = train(cfg)
    assert res.summary["resumed_from"] is None and (run / "final").is_dir()


# -- 4. no pickle on load --------------------------------------------------------------------------------------------

class _Planted:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('PLANTED_MARK', '/tmp/tunesmith-planted')}",))


def test_a_planted_checkpoint_is_refused_not_run(tmp_path, tiny_model_dir, instruction_file, monkeypatch):
    cfg = tiny_cfg(tmp_path, tiny_model_dir, instruction_file, "train.max_steps=4", "train.save_every_steps=2")
    run = train(cfg).run_dir
    import shutil
    shutil.rmtree(run / "final")
    ckpt = checkpoint.all_checkpoints(run)[-1]
    mark = tmp_path / "planted"
    monkeypatch.setenv("PLANTED_MARK", str(mark))
    with open(ckpt / "state.pt", "wb") as f:
        pickle.dump({"optimizer": _Planted()}, f)
    manifest = json.loads((ckpt / "manifest.json").read_text())  # the checksum is rewritten too, as an attacker would
    manifest["state.pt"] = {"bytes": (ckpt / "state.pt").stat().st_size, "sha256": checkpoint.sha256_of(ckpt / "state.pt")}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TunesmithError, match="holds objects a checkpoint does not"):
        train(cfg, resume=run)
    assert not mark.exists()


def test_a_damaged_tokenized_data_cache_entry_is_rebuilt(tmp_path, tiny_tokenizer, instruction_file, capsys):
    from tunesmith.config import DataConfig
    from tunesmith.data import cache, prepare

    cfg = DataConfig(path=str(instruction_file), val_size=4)
    first = prepare(cfg, tiny_tokenizer)
    entry = cache.cache_dir() / first.stats["fingerprint"]
    assert (entry / "rest.json").exists() and not list(entry.glob("*.pkl"))
    (entry / "train.npz").write_bytes((entry / "train.npz").read_bytes()[:100])  # torn
    again = prepare(cfg, tiny_tokenizer)
    assert "damaged" in capsys.readouterr().err and "from_cache" not in again.stats
    third = prepare(cfg, tiny_tokenizer)
    assert "from_cache" in third.stats and [t.input_ids.tolist() for t in third.val.tokens] == \
        [t.input_ids.tolist() for t in first.val.tokens] and third.val.examples == first.val.examples


# -- 5. a full disk --------------------------------------------------------------------------------------------------

def _limited(limit_bytes: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return preexec


def _cli(args, limit=None, **kw):
    return subprocess.run([sys.executable, "-m", "tunesmith.cli.main", *args], capture_output=True, text=True,
                          preexec_fn=_limited(limit) if limit else None, timeout=600, **kw)


def test_a_checkpoint_that_cannot_be_written_costs_only_that_checkpoint(tmp_path, tiny_model_dir, instruction_file):
    from tunesmith.config import dump_yaml

    def recipe(name):
        cfg = tiny_cfg(tmp_path, tiny_model_dir, instruction_file, "train.max_steps=4", "train.save_every_steps=2",
                       "method.r=128", "train.threads=1", f"output.name={name}")
        path = tmp_path / f"{name}.yaml"
        path.write_text(dump_yaml(cfg))
        return path

    sized = RunDir(train(load_config(str(recipe("sized")))).run_dir)  # the files' sizes, unlimited
    state = (checkpoint.all_checkpoints(sized)[0] / "state.pt").stat().st_size  # LoRA r=128's optimizer moments
    others = max(p.stat().st_size for p in sized.path.rglob("*") if p.is_file() and p.name != "state.pt")
    assert others < state
    # a real file-size limit, between the largest other file and the checkpoint's state: only checkpoints fail
    p = _cli(["train", str(recipe("limited"))], limit=(others + state) // 2)
    assert p.returncode == 0, p.stderr
    assert "could not write the checkpoint at step 2: File too large" in p.stdout + p.stderr
    run = RunDir(tmp_path / "runs" / "limited")
    assert not checkpoint.all_checkpoints(run) and run.final.is_dir()  # nothing claims a checkpoint that is not there
    assert not [q for q in run.path.rglob("*") if ".tmp" in q.name]  # no temporary files left behind


def test_a_final_save_that_fails_is_an_error_and_the_last_checkpoint_stays(tmp_path, tiny_model_dir, instruction_file):
    from tunesmith.config import dump_yaml

    cfg = tiny_cfg(tmp_path, tiny_model_dir, instruction_file, "train.max_steps=4", "train.save_every_steps=2",
                   "method.r=64", "train.threads=1")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(dump_yaml(cfg))
    first = _cli(["train", str(recipe)])
    run = RunDir(tmp_path / "runs" / "t")
    assert first.returncode == 0, first.stderr
    import shutil
    shutil.rmtree(run.final)  # as if it had stopped after its checkpoint at step 2
    (ckpt,) = checkpoint.all_checkpoints(run)
    assert checkpoint.problem(ckpt) is None
    p = _cli(["train", "--resume", str(run)], limit=30_000)  # below the adapter's size: final/ cannot be written
    assert p.returncode == 2, p.stderr
    assert f"could not save the trained model to {run.final}" in p.stderr and "step-0000002 is intact" in p.stderr
    assert not run.final.exists() and checkpoint.problem(ckpt) is None
