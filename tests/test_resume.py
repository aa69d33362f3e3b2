"""Crash safety and exact resume (issue 7): kill -9, Ctrl-C, corrupt checkpoints, failed saves,
non-finite losses, retention, and refusing to resume on changed inputs."""
import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tunesmith.config import dump_yaml, load_config, read_yaml
from tunesmith.errors import TunesmithError
from tunesmith.train import checkpoint
from tunesmith.train.loop import train
from test_train import tiny_cfg

STEPS = 60  # long enough that a kill lands mid-run (the tiny model does ~70 steps/s)


def resume_cfg(tmp_path, tiny_model_dir, instruction_file, name, *extra):
    # one thread: bitwise-equal results need the same reduction order in both runs
    return tiny_cfg(tmp_path, tiny_model_dir, instruction_file, f"train.max_steps={STEPS}", "train.threads=1",
                    "train.micro_batch_size=2", "train.grad_accum=2", "train.save_every_steps=2",
                    "eval.every_steps=4", f"output.name={name}", *extra)


def adapter(run_dir):
    return load_file(run_dir / "final" / "adapter_model.safetensors")


def assert_same_run(a, b):
    wa, wb = adapter(a), adapter(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    losses = [[(r["step"], r.get("loss"), r.get("eval_loss")) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
              for d in (a, b)]
    assert losses[0] == losses[1]


@pytest.fixture
def reference_run(tmp_path, tiny_model_dir, instruction_file):
    return train(resume_cfg(tmp_path, tiny_model_dir, instruction_file, "reference")).run_dir


def cli(*args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "tunesmith.cli.main", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def write_config(tmp_path, cfg):
    path = tmp_path / f"{cfg.output.name}.yaml"
    path.write_text(dump_yaml(cfg))
    return path


def wait_for(pred, proc, timeout=120):
    t0 = time.time()
    while not pred():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.02)


def test_kill_minus_9_at_random_points_then_resume_equals_uninterrupted(tmp_path, tiny_model_dir, instruction_file, reference_run):
    rng = random.Random()
    for attempt in range(2):
        cfg = resume_cfg(tmp_path, tiny_model_dir, instruction_file, f"killed{attempt}")
        proc = cli("train", str(write_config(tmp_path, cfg)))
        run = tmp_path / "runs" / cfg.output.name
        first = rng.choice([2, 6, 10, 14])
        wait_for(lambda run=run, first=first: (run / "checkpoints" / f"step-{first:07d}").exists(), proc)
        time.sleep(rng.uniform(0, 0.15))  # anywhere: mid-step, mid-save, mid-log
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (run / "final").exists(), "the run finished before it could be killed; make it longer"
        resumed = cli("train", "--resume", str(run))
        out, err = resumed.communicate(timeout=300)
        assert resumed.returncode == 0, err
        assert_same_run(reference_run, run)


def test_ctrl_c_writes_a_checkpoint_and_prints_the_resume_command(tmp_path, tiny_model_dir, instruction_file, reference_run):
    cfg = resume_cfg(tmp_path, tiny_model_dir, instruction_file, "interrupted", "train.save_every_steps=1000")
    proc = cli("train", str(write_config(tmp_path, cfg)))
    run = tmp_path / "runs" / "interrupted"
    wait_for(lambda: (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 4, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"resume with: tunesmith train --resume {run}" in err
    assert checkpoint.all_checkpoints(run) and not (run / "final").exists()
    resumed = cli("train", "--resume", str(run))
    assert resumed.wait(timeout=300) == 0, resumed.communicate()[1]
    assert_same_run(reference_run, run)


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, tiny_model_dir, instruction_file, reference_run, capsys):
    cfg = resume_cfg(tmp_path, tiny_model_dir, instruction_file, "damaged")
    run = train(cfg).run_dir
    import shutil
    shutil.rmtree(run / "final")  # pretend it stopped after the last checkpoint
    newest = checkpoint.all_checkpoints(run)[-1]
    data = (newest / "trainable.safetensors").read_bytes()
    (newest / "trainable.safetensors").write_bytes(data[: len(data) // 2])
    res = train(cfg, resume=run)
    assert f"checkpoint {newest.name} is damaged" in capsys.readouterr().out
    assert res.summary["resumed_from"] == STEPS - 4
    assert_same_run(reference_run, run)


def test_resume_refuses_changed_data_unless_forced(tmp_path, tiny_model_dir, instruction_file):
    cfg = resume_cfg(tmp_path, tiny_model_dir, instruction_file, "changed", "train.max_steps=4")
    run = train(cfg).run_dir
    import shutil
    shutil.rmtree(run / "final")
    with open(instruction_file, "a", encoding="utf-8") as f:
        f.write('{"instruction": "new", "output": "row"}\n')
    with pytest.raises(TunesmithError, match="training data .* changed"):
        train(cfg, resume=run)
    assert train(cfg, resume=run, force_resume=True).summary["resumed_from"] == 2


@pytest.mark.parametrize("before, after", [(None, 4.0), (4.0, None), (4.0, 8.0)])
def test_resume_refuses_a_changed_loraplus_ratio(tmp_path, tiny_model_dir, instruction_file, before, after):
    cfg = resume_cfg(tmp_path, tiny_model_dir, instruction_file, "loraplus", "train.max_steps=4",
                     f"method.loraplus_lr_ratio={before or 'null'}")
    run = train(cfg).run_dir
    import shutil
    shutil.rmtree(run / "final")
    changed = cfg.model_copy(update={"method": cfg.method.model_copy(update={"loraplus_lr_ratio": after})})
    with pytest.raises(TunesmithError, match="loraplus_lr_ratio changed"):
        train(changed, resume=run)
    assert train(cfg, resume=run).summary["resumed_from"] == 2


def test_resume_names_the_settings_that_changed(tmp_path, tiny_model_dir, instruction_file, capsys):
    cfg = resume_cfg(tmp_path, tiny_model_dir, instruction_file, "changed", "train.max_steps=4")
    run = train(cfg).run_dir
    import shutil
    shutil.rmtree(run / "final")
    capsys.readouterr()
    changed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"neftune_noise_alpha": 5.0})})
    train(changed, resume=run)
    line = "resuming with changed settings (config.yaml now has the new ones): train.neftune_noise_alpha: None -> 5.0"
    assert line in capsys.readouterr().out and line in (run / "train.log").read_text()
    assert read_yaml(run / "config.yaml")["train"]["neftune_noise_alpha"] == 5.0
    shutil.rmtree(run / "final")
    train(changed, resume=run)  # the same settings again: nothing to say
    assert "changed settings" not in capsys.readouterr().out


def _train_then_resume_on_another_cpu(cfg, monkeypatch, capsys, amx_first: bool):
    """Train `cfg` on a CPU with (or without) AMX, then resume it on one without (or with): the resume's output."""
    import shutil

    from tunesmith.methods import precision as load_module

    monkeypatch.setattr(load_module, "cpu_has_amx", lambda: amx_first)
    run = train(cfg).run_dir
    shutil.rmtree(run / "final")
    capsys.readouterr()
    monkeypatch.setattr(load_module, "cpu_has_amx", lambda: not amx_first)
    train(cfg, resume=run)
    return run, capsys.readouterr().out


def test_resume_says_when_auto_dtype_resolves_differently(tmp_path, tiny_model_dir, instruction_file, monkeypatch, capsys):
    """model.dtype auto picks bfloat16 for LoRA on an AMX CPU: a run resumed on another machine says it changes dtype."""
    import shutil

    from tunesmith.methods import precision as load_module

    cfg = resume_cfg(tmp_path, tiny_model_dir, instruction_file, "moved", "train.max_steps=4")
    run, out = _train_then_resume_on_another_cpu(cfg, monkeypatch, capsys, amx_first=False)
    log = (run / "train.log").read_text()
    line = re.search(r"note: this run trained in float32 up to step \d+ and goes on in bfloat16 \(model.dtype=auto\); "
                     r"set model.dtype=float32 to keep it", out)
    assert line and line.group(0) in log
    shutil.rmtree(run / "final")
    monkeypatch.setattr(load_module, "cpu_has_amx", lambda: False)
    train(cfg.model_copy(update={"model": cfg.model.model_copy(update={"dtype": "float32"})}), resume=run)
    assert "goes on in" not in capsys.readouterr().out  # the checkpoint's own dtype: nothing to say


def test_resume_says_when_auto_mixed_precision_resolves_differently(tmp_path, tiny_model_dir, instruction_file, monkeypatch, capsys):
    cfg = resume_cfg(tmp_path, tiny_model_dir, instruction_file, "moved-full", "train.max_steps=4", "method.name=full")
    _, out = _train_then_resume_on_another_cpu(cfg, monkeypatch, capsys, amx_first=True)
    assert re.search(r"note: this run trained in float32 weights with bfloat16 matmuls up to step \d+ and goes on in "
                     r"float32 \(train.mixed_precision=auto\); set train.mixed_precision=bf16 to keep it", out)


def test_failed_checkpoint_write_keeps_the_previous_one_and_training_goes_on(tmp_path, tiny_model_dir, instruction_file, monkeypatch, capsys):
    real, calls = checkpoint.save_file, []

    def flaky(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", flaky)
    run = train(resume_cfg(tmp_path, tiny_model_dir, instruction_file, "full-disk", "train.max_steps=8")).run_dir
    out = capsys.readouterr().out
    assert "could not write the checkpoint at step 4: No space left on device; the previous checkpoint step-0000002 is intact" in out
    assert [p.name for p in checkpoint.all_checkpoints(run)] == ["step-0000002", "step-0000006"]
    assert all(checkpoint.problem(p) is None for p in checkpoint.all_checkpoints(run))
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no half-written folder left


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_loss(tmp_path, tiny_model_dir, instruction_file, monkeypatch, policy):
    from tunesmith.objectives.sft import SFT

    real, calls = SFT.loss, []

    def poisoned(*a, **kw):
        calls.append(1)
        loss = real(*a, **kw)
        return loss * float("nan") if len(calls) == 5 else loss  # step 3's first pass (2 passes per step)

    monkeypatch.setattr(SFT, "loss", poisoned)
    cfg = resume_cfg(tmp_path, tiny_model_dir, instruction_file, policy, "train.max_steps=6", f"train.on_nonfinite={policy}")
    if policy == "stop":
        with pytest.raises(TunesmithError, match=r"step 3: loss nan.*not finite.*step-0000002"):
            train(cfg)
    else:
        res = train(cfg)
        assert res.summary["skipped_steps"] == [3]
        assert all(torch.isfinite(t).all() for t in adapter(res.run_dir).values())


def test_retention_keeps_the_newest_and_the_best(tmp_path):
    for step, loss in [(2, 1.0), (4, 0.5), (6, 0.7), (8, None), (10, 0.9)]:
        d = tmp_path / "checkpoints" / f"step-{step:07d}"
        d.mkdir(parents=True)
        (d / "progress.json").write_text(json.dumps({"step": step, "eval_loss": loss}))
    removed = checkpoint.prune(tmp_path, keep=2)
    assert removed == ["step-0000002", "step-0000006"]
    assert [p.name for p in checkpoint.all_checkpoints(tmp_path)] == ["step-0000004", "step-0000008", "step-0000010"]


def test_output_resume_auto_continues_a_stopped_run(tmp_path, tiny_model_dir, instruction_file, reference_run):
    cfg = resume_cfg(tmp_path, tiny_model_dir, instruction_file, "auto", "output.resume=auto")
    run = train(cfg).run_dir
    import shutil
    shutil.rmtree(run / "final")
    for p in checkpoint.all_checkpoints(run)[5:]:
        shutil.rmtree(p)
    assert train(cfg).summary["resumed_from"] == 10
    assert_same_run(reference_run, run)
    with pytest.raises(TunesmithError, match="already exists"):
        train(cfg)  # finished now: auto does not resume (or overwrite) a finished run


def test_full_fine_tuning_through_bfloat16_weight_copies_resumes_exactly(tmp_path, tiny_model_dir, instruction_file):
    """The copies are not in a checkpoint: trained ones are rebuilt from the float32 weights every step, frozen ones
    (the embeddings) from the base, so a resumed run goes on bit for bit."""
    import shutil

    def run(name):
        cfg = resume_cfg(tmp_path, tiny_model_dir, instruction_file, name, "method.name=full", "train.lr=1e-3",
                         "train.mixed_precision=bf16", "train.max_steps=12", "output.resume=auto")
        return cfg, train(cfg).run_dir

    _, reference = run("copies-reference")
    cfg, stopped = run("copies-stopped")
    shutil.rmtree(stopped / "final")
    for p in checkpoint.all_checkpoints(stopped)[2:]:
        shutil.rmtree(p)
    assert train(cfg).summary["resumed_from"] == 4
    weights = [load_file(d / "final" / "model.safetensors") for d in (reference, stopped)]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    losses = [[(r["step"], r.get("loss")) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
              for d in (reference, stopped)]
    assert losses[0] == losses[1]


BAD_DATA = {
    "empty.jsonl": "",
    "not_json.jsonl": '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n',
    "wrong_role.jsonl": '{"messages": [{"role": "user", "content": "hi"}, {"role": "asistant", "content": "yo"}]}\n',
    "mixed.jsonl": '{"instruction": "a", "output": "b"}\n{"prompt": "a", "completion": "b"}\n',
    "missing_output.jsonl": '{"instruction": "a"}\n',
    "nan.csv": "instruction,output\na,\n",
    "latin1.jsonl": '{"instruction": "caf\xe9", "output": "b"}\n'.encode("latin-1"),
    "array.json": '{"not": "a list"}',
    "unknown.xyz": "whatever",
    "null_output.jsonl": '{"instruction": "a", "output": null}\n',
    "bom.jsonl": "\ufeff" + '{"instruction": "a", "output": "b"}\n{"nope": 1}\n',
}
BAD_OVERRIDES = [["train.lrr=1"], ["train.lr=-1"], ["method.name=lorax"], ["data.template=nope {x}"],
                 ["train.max_steps=abc"], ["data.overlong=cut"], ["model.name=/no/such/model"], ["data.path=/no/such.jsonl"]]


@pytest.mark.parametrize("case", list(BAD_DATA) + [" ".join(o) for o in BAD_OVERRIDES])
def test_malformed_inputs_end_in_one_clear_error(tmp_path, tiny_model_dir, instruction_file, capsys, case):
    """Fuzz-style: every bad file or config is a one-line `error:` and exit 2, never a traceback or a run dir."""
    args = [f"model.name={tiny_model_dir}", f"output.dir={tmp_path / 'runs'}", "train.max_steps=1", "eval.samples=0"]
    if case in BAD_DATA:
        content = BAD_DATA[case]
        path = tmp_path / case
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        args.append(f"data.path={path}")
    else:
        args += [f"data.path={instruction_file}", *case.split()]
    code = main_cli(["train", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def main_cli(argv):
    from tunesmith.cli.main import main

    return main(argv)


def test_plan_and_the_preflight_memory_check(tmp_path, tiny_model_dir, instruction_file, monkeypatch, capsys):
    from tunesmith.cli.main import main
    from tunesmith.train import plan

    args = [f"model.name={tiny_model_dir}", f"data.path={instruction_file}", f"output.dir={tmp_path / 'runs'}",
            "train.max_steps=2", "eval.samples=0"]
    assert main(["plan", *args]) == 0
    out = capsys.readouterr().out
    assert "activations" in out and "fits" in out and "time estimate" in out
    assert "max_minutes" not in out
    for dtype in ("float32", "bfloat16"):  # bf16: LoRA's fp32 adapters on a bf16 base, timed with bf16 matmuls
        assert main(["plan", *args, f"model.dtype={dtype}"]) == 0
        assert f"GFLOP/s measured in {dtype} ->" in capsys.readouterr().out
    assert main(["plan", *args, "train.max_steps=null", "train.epochs=1000", "train.max_minutes=0.01"]) == 0
    assert "train.max_minutes stops it after ~1 s" in capsys.readouterr().out
    monkeypatch.setattr(plan, "available_memory", lambda: 0.1 * plan.GiB)
    assert main(["plan", *args]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert "would not fit in memory" in err and "train.gradient_checkpointing=true" in err and "--force" in err
    assert not (tmp_path / "runs").exists()
    assert main(["train", *args, "--force"]) == 0


def test_plan_times_the_matmuls_in_the_dtype_most_weights_are_in():
    import torch

    from tunesmith.train.plan import matmul_dtype

    model = torch.nn.Sequential(torch.nn.Embedding(100, 16), torch.nn.Linear(16, 4))
    assert matmul_dtype(model) == torch.float32
    model[0].to(torch.bfloat16)  # 1600 bf16 weights against 68 fp32 (as a bf16 base with fp32 adapters)
    assert matmul_dtype(model) == torch.bfloat16
    assert matmul_dtype(model.to(torch.float16)) == torch.float32  # no measured step efficiency: float32's


def test_plan_times_full_fine_tunings_weight_copies_in_bfloat16(tiny_model_dir, monkeypatch):
    import torch

    from tunesmith.methods.load import load_model
    from tunesmith.train import plan

    timed = []
    monkeypatch.setattr(plan, "matmul_gflops", lambda seconds, dtype, device: timed.append((dtype, device.type)) or 100.0)
    model = load_model(tiny_model_dir, torch.float32)
    stats = {"train": {"length_max": 64, "tokens": 6400, "kept": 100, "label_share": 0.5}, "val": {"tokens": 640}}
    cfg = load_config(None, ["method.name=full"])
    assert plan.estimate(cfg, model, 1, stats, 10, time_it=0.1).dtype == torch.float32
    copies = plan.estimate(cfg, model, 1, stats, 10, time_it=0.1, matmuls=torch.bfloat16)
    assert copies.dtype == torch.bfloat16 and timed == [(torch.float32, "cpu"), (torch.bfloat16, "cpu")]  # where the model is
    assert "measured in bfloat16" in copies.describe()


def test_plan_counts_frozen_first_blocks_as_forward_only():
    from transformers import LlamaConfig

    from tunesmith.train.plan import flops_per_token

    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2)
    for full, mult in ((True, 3), (False, 2)):
        f = [flops_per_token(cfg, 32, 0.5, full, frozen) for frozen in range(5)]
        saved = [a - b for a, b in zip(f, f[1:])]
        assert saved[0] > 0 and all(s == pytest.approx(saved[0]) for s in saved)  # each frozen block saves its backward
        block_forward = saved[0] / (mult - 1)
        assert f[0] == pytest.approx(mult * (4 * block_forward + 2 * 64 * 100 * 0.5))
        assert f[4] == pytest.approx(4 * block_forward + mult * 2 * 64 * 100 * 0.5)


def test_rl_resumed_between_two_updates_on_one_batch_goes_on_with_its_rollouts(tmp_path, tiny_model_dir):
    """rl.updates=2: steps 3 and 4 train on one batch of rollouts. A run resumed from the checkpoint after step 3
    takes that batch from the checkpoint (completions, old log-probs, advantages), not new samples from the updated
    weights, so it ends bit for bit as the uninterrupted run."""
    import shutil

    from conftest import write_jsonl
    from test_rl import VOWELS

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Say something about {i}.", "answer": str(i)}
                                                       for i in range(24)])
    (tmp_path / "my_rewards.py").write_text(VOWELS)

    def run(name):
        cfg = tiny_cfg(tmp_path, tiny_model_dir, prompts, "task=rl", "method.name=lora", "train.max_steps=6",
                       "train.threads=1", "train.lr=5e-2", "train.micro_batch_size=2", "train.save_every_steps=1",
                       "rl.updates=2", "rl.beta=0.1", "rl.group_size=3", "rl.max_new_tokens=8", "eval.samples=0",
                       f"rl.rewards=[{{kind: function, path: {tmp_path / 'my_rewards.py'}:vowels}}]",
                       f"output.name={name}", "output.resume=auto")
        return cfg, train(cfg).run_dir

    _, reference = run("rl-reference")
    cfg, stopped = run("rl-stopped")
    shutil.rmtree(stopped / "final")
    for p in checkpoint.all_checkpoints(stopped)[3:]:  # the newest left: after step 3, the batch's first update
        shutil.rmtree(p)
    assert train(cfg).summary["resumed_from"] == 3
    assert_same_run(reference, stopped)
    rows = [json.loads(x) for x in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("rollout_reused", 0) for r in rows if "reward" in r] == [0, 1] * 3
