"""Data-parallel training under torchrun on CPU (gloo): 2 processes equal 1 process with the same
global batch; examples are sharded without duplicates or drops; only rank 0 writes."""
import json

from tunesmith.cli.main import main
from tunesmith.config import dump_yaml
from tunesmith.train.distributed import Dist, shard
from test_train import tiny_cfg

# Every run here compares numbers across process counts and backends to 1e-5: float32 throughout (auto would pick
# bfloat16 for LoRA, and bfloat16 matmuls for full fine-tuning, alone or under DDP on a CPU with AMX, and float32
# under FSDP / DeepSpeed).
FLOAT32 = ["model.dtype=float32", "train.mixed_precision=no"]


def test_shards_cover_each_step_once():
    step = list(range(11))
    parts = [shard(step, Dist(rank=r, world=3)) for r in range(3)]
    assert sorted(sum(parts, [])) == step
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_each_gpu_process_takes_its_local_rank_s_gpu(monkeypatch):
    """On GPUs every torchrun process selects the GPU of its LOCAL_RANK before NCCL starts (they all took cuda:0,
    which NCCL refuses for two ranks); checked without a GPU by recording the calls."""
    import torch
    import torch.distributed as dist

    from tunesmith.train import distributed

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    d = distributed.setup(torch.device("cuda"), "fsdp")
    assert calls == [("set_device", 1), ("init", "nccl")] and (d.rank, d.world, d.fsdp) == (1, 2, True)
    calls.clear()
    distributed.setup(torch.device("cpu"))
    assert calls == [("init", "gloo")]


def rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def run_one_and_two(tmp_path, model_dir, data_file, common: list, two_extra: list, keys: tuple, tol: float = 1e-5) -> None:
    """Run `common` on 1 process (grad_accum 2) as runs/one and on 2 processes (grad_accum 1, + `two_extra`) as
    runs/two -- the same global batch -- and check their metrics rows agree on `keys` to `tol`."""
    one = tiny_cfg(tmp_path, model_dir, data_file, *common, "train.grad_accum=2", "output.name=one")
    two = tiny_cfg(tmp_path, model_dir, data_file, *common, "train.grad_accum=1", "output.name=two", *two_extra)
    for cfg in (one, two):
        (tmp_path / f"{cfg.output.name}.yaml").write_text(dump_yaml(cfg))
    assert main(["train", str(tmp_path / "one.yaml")]) == 0
    assert main(["train", str(tmp_path / "two.yaml"), "--nproc", "2"]) == 0
    a, b = rows(tmp_path / "runs" / "one"), rows(tmp_path / "runs" / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for key in keys:
            if key in x:
                assert abs(x[key] - y[key]) < tol, (key, x, y)


def test_two_processes_match_one(tmp_path, tiny_model_dir, instruction_file, capsys):
    common = [*FLOAT32, "train.max_steps=6", "train.threads=1", "data.val_size=8", "eval.every_steps=3", "eval.samples=0",
              "train.micro_batch_size=4"]
    run_one_and_two(tmp_path, tiny_model_dir, instruction_file, common, [], ("loss", "eval_loss", "tokens"))
    s = json.loads((tmp_path / "runs" / "two" / "eval.json").read_text())
    assert s["processes"] == 2 and s["global_batch"] == 8
    assert sum(s["examples_per_rank"]) == s["examples"] == 48 and min(s["examples_per_rank"]) > 0
    assert len((tmp_path / "runs" / "two" / "train.log").read_text().splitlines()) == \
        len((tmp_path / "runs" / "one" / "train.log").read_text().splitlines())  # one writer, no duplicated lines


def test_grpo_dapo_on_two_processes_matches_one(tmp_path, tiny_model_dir):
    """GRPO's rollouts are seeded per (batch, prompt, completion), so both runs sample the same completions; the dapo
    loss averages over the global step's completion tokens and the logged rollout statistics are over both processes'
    rollouts, so two processes train and log as one. Counted per process, as before, the first step's loss read
    -0.0206 against -0.0199 and the reward was rank 0's half only (0.017 off); entropy was rank 0's tokens'."""
    from conftest import write_jsonl
    from test_rl import VOWELS

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Say something about {i}.", "answer": str(i)}
                                                       for i in range(24)])
    (tmp_path / "my_rewards.py").write_text(VOWELS)
    common = [*FLOAT32, "task=rl", "method.name=lora", "train.max_steps=3", "train.threads=1", "train.lr=5e-2",
              "train.micro_batch_size=2", "rl.loss=dapo", "rl.group_size=3", "rl.max_new_tokens=10", "eval.samples=0",
              f"rl.rewards=[{{kind: function, path: {tmp_path / 'my_rewards.py'}:vowels}}]"]
    run_one_and_two(tmp_path, tiny_model_dir, prompts, common, [], ("loss", "reward", "completion_length", "entropy",
                                                                    "clip_ratio", "skipped_groups", "eval_reward"))


def test_full_fine_tuning_through_bfloat16_weight_copies_on_two_processes_matches_one(tmp_path, tiny_model_dir, instruction_file):
    """train.mixed_precision=bf16 (auto on an AMX CPU or a bf16 GPU): each rank's bfloat16 gradients are summed in
    float32 before the all-reduce, as one process sums its passes. The two runs' float32 sums round differently in the
    last bits, which can flip a weight's bfloat16 copy: losses agree to 5e-5 here, not 1e-5; without the all-reduce
    they differ by 1.6e-3."""
    common = ["method.name=full", "train.lr=1e-3", "train.mixed_precision=bf16", "train.max_steps=6", "train.threads=1",
              "data.val_size=8", "eval.every_steps=3", "eval.samples=0", "train.micro_batch_size=4"]
    run_one_and_two(tmp_path, tiny_model_dir, instruction_file, common, [], ("loss", "eval_loss", "tokens"), tol=3e-4)


def test_a_run_started_on_two_processes_resumes_on_one(tmp_path, tiny_model_dir, instruction_file):
    import shutil

    from safetensors.torch import load_file

    from tunesmith.train.loop import train

    common = [*FLOAT32, "train.max_steps=6", "train.threads=1", "data.val_size=8", "eval.samples=0", "train.micro_batch_size=4",
              "train.save_every_steps=2"]
    two = tiny_cfg(tmp_path, tiny_model_dir, instruction_file, *common, "train.grad_accum=1", "output.name=two")
    (tmp_path / "two.yaml").write_text(dump_yaml(two))
    assert main(["train", str(tmp_path / "two.yaml"), "--nproc", "2"]) == 0
    run = tmp_path / "runs" / "two"
    reference = load_file(run / "final" / "adapter_model.safetensors")
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "step-0000004")  # as if stopped after step 2
    one = tiny_cfg(tmp_path, tiny_model_dir, instruction_file, *common, "train.grad_accum=2", "output.name=two")
    assert train(one, resume=run).summary["resumed_from"] == 2
    resumed = load_file(run / "final" / "adapter_model.safetensors")
    assert all((reference[k] - resumed[k]).abs().max() < 1e-5 for k in reference)


def test_grpo_stopped_between_two_updates_on_two_processes_resumes_on_one(tmp_path, tiny_model_dir):
    """rl.updates=2 on 2 processes, stopped after step 3 (the first update on the second batch of rollouts): the
    checkpoint holds both processes' groups, so 1 process resumes on the same rollouts and ends as the 2 did."""
    import shutil

    from safetensors.torch import load_file

    from conftest import write_jsonl
    from test_rl import VOWELS
    from tunesmith.train.loop import train

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Say something about {i}.", "answer": str(i)}
                                                       for i in range(24)])
    (tmp_path / "my_rewards.py").write_text(VOWELS)
    common = [*FLOAT32, "task=rl", "method.name=lora", "train.max_steps=4", "train.threads=1", "train.lr=5e-2",
              "train.micro_batch_size=2", "train.save_every_steps=1", "rl.updates=2", "rl.group_size=3",
              "rl.max_new_tokens=8", "eval.samples=0", f"rl.rewards=[{{kind: function, path: {tmp_path / 'my_rewards.py'}:vowels}}]"]
    two = tiny_cfg(tmp_path, tiny_model_dir, prompts, *common, "train.grad_accum=1", "output.name=two")
    (tmp_path / "two.yaml").write_text(dump_yaml(two))
    assert main(["train", str(tmp_path / "two.yaml"), "--nproc", "2"]) == 0
    run = tmp_path / "runs" / "two"
    reference = load_file(run / "final" / "adapter_model.safetensors")
    shutil.rmtree(run / "final")
    one = tiny_cfg(tmp_path, tiny_model_dir, prompts, *common, "train.grad_accum=2", "output.name=two")
    assert train(one, resume=run).summary["resumed_from"] == 3  # the newest checkpoint: mid-batch
    resumed = load_file(run / "final" / "adapter_model.safetensors")
    assert all((reference[k] - resumed[k]).abs().max() < 1e-5 for k in reference)
    assert [r.get("rollout_reused", 0) for r in rows(run) if "reward" in r] == [0, 1, 0, 1]


def test_fsdp_two_processes_match_one(tmp_path, tiny_model_dir, instruction_file):
    """FSDP2-sharded LoRA on 2 processes == 1 process: loss curve, held-out loss and the saved adapter. A small
    token budget per pass gives the ranks different numbers of passes (filler passes must count nothing)."""
    from safetensors.torch import load_file

    common = [*FLOAT32, "train.max_steps=4", "train.threads=1", "data.val_size=8", "eval.every_steps=2", "eval.samples=2",
              "train.micro_batch_size=4", "train.batch_tokens=40"]
    run_one_and_two(tmp_path, tiny_model_dir, instruction_file, common, ["train.distributed=fsdp"],
                    ("loss", "eval_loss", "grad_norm"))
    s = json.loads((tmp_path / "runs" / "two" / "eval.json").read_text())
    assert sum(s["examples_per_rank"]) == s["examples"] == 32
    ref, got = (load_file(tmp_path / "runs" / n / "final" / "adapter_model.safetensors") for n in ("one", "two"))
    assert ref.keys() == got.keys() and all((ref[k] - got[k]).abs().max() < 1e-5 for k in ref)
    assert len(s["side_by_side"]) == 2  # rank 0 generated with the sharded model (every rank joined)


def test_fsdp_full_finetune_checkpoint_resumes_on_one_process(tmp_path, tiny_model_dir, instruction_file):
    """Full fine-tuning sharded on 2 processes writes consolidated checkpoints: stopped after step 2, the run
    continues on 1 process (no FSDP) to the same final weights."""
    import shutil

    from safetensors.torch import load_file

    from tunesmith.train.loop import train

    common = [*FLOAT32, "method.name=full", "train.max_steps=4", "train.threads=1", "data.val_size=8", "eval.samples=0",
              "train.micro_batch_size=4", "train.save_every_steps=2", "output.name=run"]
    two = tiny_cfg(tmp_path, tiny_model_dir, instruction_file, *common, "train.grad_accum=1", "train.distributed=fsdp")
    (tmp_path / "two.yaml").write_text(dump_yaml(two))
    assert main(["train", str(tmp_path / "two.yaml"), "--nproc", "2"]) == 0
    run = tmp_path / "runs" / "run"
    reference = load_file(run / "final" / "model.safetensors")
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "step-0000004", ignore_errors=True)
    one = tiny_cfg(tmp_path, tiny_model_dir, instruction_file, *common, "train.grad_accum=2")
    assert train(one, resume=run).summary["resumed_from"] == 2
    resumed = load_file(run / "final" / "model.safetensors")
    assert reference.keys() == resumed.keys()
    assert all((reference[k] - resumed[k]).abs().max() < 1e-5 for k in reference)


def test_deepspeed_zero2_two_processes_match_one_and_resume_on_one(tmp_path, tiny_model_dir, instruction_file):
    """DeepSpeed ZeRO-2 LoRA on 2 processes == 1 plain process (loss, grad norm, held-out loss, adapter), with a token
    budget that gives the ranks unequal pass counts; its consolidated step-2 checkpoint continues on 1 process without
    DeepSpeed to the same final adapter (the AdamW moments were gathered from the partitions)."""
    import shutil

    from safetensors.torch import load_file

    from tunesmith.train.loop import train

    common = [*FLOAT32, "train.max_steps=4", "train.threads=1", "data.val_size=8", "eval.every_steps=2", "eval.samples=0",
              "train.micro_batch_size=4", "train.batch_tokens=40", "train.save_every_steps=2"]
    run_one_and_two(tmp_path, tiny_model_dir, instruction_file, common, ["train.distributed=deepspeed"],
                    ("loss", "eval_loss", "grad_norm"))
    run = tmp_path / "runs" / "two"
    ref, got = (load_file(tmp_path / "runs" / n / "final" / "adapter_model.safetensors") for n in ("one", "two"))
    assert ref.keys() == got.keys() and all((ref[k] - got[k]).abs().max() < 1e-5 for k in ref)
    assert "DeepSpeed ZeRO stage 2" in (run / "train.log").read_text()
    shutil.rmtree(run / "final")
    one = tiny_cfg(tmp_path, tiny_model_dir, instruction_file, *common, "train.grad_accum=2", "output.name=two")
    assert train(one, resume=run).summary["resumed_from"] == 2
    resumed = load_file(run / "final" / "adapter_model.safetensors")
    assert all((ref[k] - resumed[k]).abs().max() < 1e-5 for k in ref)


def test_a_one_process_checkpoint_resumes_under_deepspeed_zero1(tmp_path, tiny_model_dir, instruction_file):
    """A plain run stopped after step 2 continues on 2 processes with ZeRO-1 (its optimizer state scattered into the
    partitions) to the same final adapter as the uninterrupted plain run."""
    import shutil

    from safetensors.torch import load_file

    common = [*FLOAT32, "train.max_steps=4", "train.threads=1", "data.val_size=8", "eval.samples=0", "train.micro_batch_size=4",
              "train.save_every_steps=2", "output.name=run"]
    one = tiny_cfg(tmp_path, tiny_model_dir, instruction_file, *common, "train.grad_accum=2")
    (tmp_path / "one.yaml").write_text(dump_yaml(one))
    assert main(["train", str(tmp_path / "one.yaml")]) == 0
    run = tmp_path / "runs" / "run"
    reference = load_file(run / "final" / "adapter_model.safetensors")
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "step-0000004", ignore_errors=True)
    assert main(["train", "--resume", str(run), "train.grad_accum=1", "train.distributed=deepspeed", "train.zero_stage=1",
                 "--nproc", "2"]) == 0
    assert "DeepSpeed ZeRO stage 1" in (run / "train.log").read_text()
    resumed = load_file(run / "final" / "adapter_model.safetensors")
    assert all((reference[k] - resumed[k]).abs().max() < 1e-5 for k in reference)


def _workers(parent_pid: int) -> dict[int, int]:
    """LOCAL_RANK -> pid of the torchrun workers below `parent_pid` (read from /proc)."""
    from pathlib import Path

    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    found, todo = {}, [parent_pid]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            todo.append(child)
            try:
                env = dict(kv.split("=", 1) for kv in open(f"/proc/{child}/environ").read().split("\0") if "=" in kv)
            except OSError:
                continue
            if "LOCAL_RANK" in env and "TORCHELASTIC_RUN_ID" in env and "torch.distributed.run" not in open(f"/proc/{child}/cmdline").read():
                found[int(env["LOCAL_RANK"])] = child
    return found


def test_sigterm_to_the_launcher_checkpoints_every_rank_and_a_dead_rank_is_named(tmp_path, tiny_model_dir, instruction_file):
    import signal
    import subprocess
    import sys
    import time

    from tunesmith.train import checkpoint

    def launch(name, *extra):
        cfg = tiny_cfg(tmp_path, tiny_model_dir, instruction_file, *FLOAT32, "train.max_steps=4000", "train.threads=1",
                       "train.save_every_steps=2", "eval.samples=0", f"output.name={name}", *extra)
        (tmp_path / f"{name}.yaml").write_text(dump_yaml(cfg))
        return subprocess.Popen([sys.executable, "-m", "tunesmith.cli.main", "train", str(tmp_path / f"{name}.yaml"),
                                 "--nproc", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_for_checkpoint(run, proc):
        t0 = time.time()
        while not checkpoint.all_checkpoints(run):
            assert proc.poll() is None, proc.communicate()
            assert time.time() - t0 < 180
            time.sleep(0.1)

    run = tmp_path / "runs" / "stopped"
    proc = launch("stopped")
    wait_for_checkpoint(run, proc)
    proc.send_signal(signal.SIGTERM)  # a scheduler's preemption: forwarded to every worker
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err
    assert f"resume with: tunesmith train --resume {run} --nproc 2" in err
    newest = checkpoint.all_checkpoints(run)[-1]
    assert checkpoint.problem(newest) is None and "SIGTERM: stopped after step" in (run / "train.log").read_text()

    run = tmp_path / "runs" / "killed"
    proc = launch("killed")
    wait_for_checkpoint(run, proc)
    workers = _workers(proc.pid)
    assert sorted(workers) == [0, 1], workers
    t0 = time.time()
    import os
    os.kill(workers[1], signal.SIGKILL)  # an OOM kill of one rank
    out, err = proc.communicate(timeout=120)
    assert time.time() - t0 < 60 and proc.returncode != 0
    assert "process rank 1 failed" in err and f"tunesmith train --resume {run} --nproc 2" in err
    assert all(checkpoint.problem(c) is None for c in checkpoint.all_checkpoints(run))
