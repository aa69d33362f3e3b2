"""The training loop end to end on a tiny random model (seconds)."""
import json

import pytest
import torch

from tunesmith.cli.main import main
from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.train.loop import train


def tiny_cfg(tmp_path, model_dir, data, *extra):
    return load_config(None, [f"model.name={model_dir}", f"data.path={data}", "data.val_size=8", "train.max_steps=12",
                              "train.micro_batch_size=4", "eval.max_examples=8", "eval.samples=2", "eval.max_new_tokens=8",
                              f"output.dir={tmp_path / 'runs'}", "output.name=t", "train.lr=1e-2", *extra])


@pytest.mark.parametrize("method", ["lora", "full"])
def test_train_lowers_heldout_loss_and_writes_the_run(tmp_path, tiny_model_dir, instruction_file, method):
    res = train(tiny_cfg(tmp_path, tiny_model_dir, instruction_file, f"method.name={method}",
                         "train.save_every_steps=5", "eval.every_steps=6"))
    s = res.summary
    assert s["after"]["eval_loss"] < s["before"]["eval_loss"]
    run = res.run_dir
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0] + list(range(1, 13)) + [12]  # before, every step, after
    assert lines[0]["eval_loss"] == s["before"]["eval_loss"] and lines[-1]["eval_loss"] == s["after"]["eval_loss"]
    assert {"step", "epoch", "loss", "lr", "tokens", "tok_s", "elapsed"} <= set(lines[1])
    assert "eval_loss" in lines[6]
    assert (run / "config.yaml").exists() and (run / "train.log").exists() and (run / "eval.json").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000005", "step-0000010"]
    assert (run / "final" / ("adapter_config.json" if method == "lora" else "config.json")).exists()
    assert len(s["side_by_side"]) == 2


def test_auto_dtype_on_a_cpu_with_amx_is_bfloat16_only_for_causal_lora_outside_fsdp_and_deepspeed(monkeypatch):
    from tunesmith.methods import precision as load_module

    cpu = torch.device("cpu")
    monkeypatch.setattr(load_module, "cpu_has_amx", lambda: True)
    assert load_module.pick_dtype("auto", cpu, "lora", "causal", "ddp") == torch.bfloat16
    for method, task, distributed in [("full", "causal", "ddp"), ("bitfit", "causal", "ddp"), ("qlora", "causal", "ddp"),
                                      ("lora", "classification", "ddp"), ("lora", "dpo", "ddp"), ("lora", "auto", "ddp"),
                                      ("lora", "causal", "fsdp"), ("lora", "causal", "deepspeed")]:
        assert load_module.pick_dtype("auto", cpu, method, task, distributed) == torch.float32, (method, task, distributed)
    assert load_module.pick_dtype("float32", cpu, "lora", "causal") == torch.float32
    monkeypatch.setattr(load_module, "cpu_has_amx", lambda: False)
    assert load_module.pick_dtype("auto", cpu, "lora", "causal", "ddp") == torch.float32


def test_full_fine_tuning_keeps_float32_weights_and_gets_bfloat16_matmuls_where_they_are_fast(monkeypatch):
    from tunesmith.methods import precision as load_module

    cpu, gpu, bf16, fp32 = torch.device("cpu"), torch.device("cuda"), torch.bfloat16, torch.float32
    monkeypatch.setattr(load_module, "cpu_has_amx", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    for device in (cpu, gpu):  # on a GPU too: bfloat16 weights would round full fine-tuning's updates away
        for method in ("full", "bitfit"):
            assert load_module.pick_dtype("auto", device, method, "causal") == fp32
            assert load_module.pick_autocast("auto", fp32, device, method, "causal", "ddp") == bf16
    assert load_module.pick_dtype("auto", gpu, "lora", "causal") == bf16
    for method, task, distributed in [("lora", "causal", "ddp"), ("full", "classification", "ddp"), ("full", "dpo", "ddp"),
                                      ("full", "causal", "fsdp"), ("full", "causal", "deepspeed")]:
        assert load_module.pick_autocast("auto", fp32, cpu, method, task, distributed) is None, (method, task, distributed)
    assert load_module.pick_autocast("auto", bf16, cpu, "full", "causal", "ddp") is None  # only over float32 weights
    assert load_module.pick_autocast("no", fp32, cpu, "full", "causal", "ddp") is None
    assert load_module.pick_autocast("bf16", fp32, cpu, "ia3", "dpo", "ddp") == bf16  # asked for: any method
    monkeypatch.setattr(load_module, "cpu_has_amx", lambda: False)
    assert load_module.pick_autocast("auto", fp32, cpu, "full", "causal", "ddp") is None


def test_bfloat16_matmuls_over_float32_weights_learn_and_save_float32(tmp_path, tiny_model_dir, instruction_file):
    from safetensors.torch import load_file

    lora = train(tiny_cfg(tmp_path, tiny_model_dir, instruction_file, "train.mixed_precision=bf16", "model.dtype=float32",
                          "output.name=lora"))
    assert lora.summary["after"]["eval_loss"] < lora.summary["before"]["eval_loss"]  # peft's layer under autocast
    res = train(tiny_cfg(tmp_path, tiny_model_dir, instruction_file, "method.name=full", "train.lr=1e-3",
                         "train.mixed_precision=bf16"))
    assert res.summary["after"]["eval_loss"] < res.summary["before"]["eval_loss"]
    assert res.summary["mixed_precision"] == "bf16" and res.summary["dtype"] == "float32"
    log = (res.run_dir / "train.log").read_text()
    assert "method: full, float32 weights, bfloat16 matmuls (bfloat16 copies of the weights in training passes) |" in log
    saved = load_file(res.run_dir / "final" / "model.safetensors")
    assert saved and all(t.dtype == torch.float32 for t in saved.values())
    base = load_file(tiny_model_dir / "model.safetensors")  # the frozen embeddings: saved as they were, not rounded
    assert torch.equal(saved["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    for bad in (["model.dtype=bfloat16"], ["train.distributed=fsdp"]):
        with pytest.raises(TunesmithError, match="train.mixed_precision=bf16 runs matmuls in bfloat16 over float32"):
            train(tiny_cfg(tmp_path, tiny_model_dir, instruction_file, "train.mixed_precision=bf16", *bad))


def test_default_pass_token_budget_doubles_where_passes_compute_in_bfloat16():
    from tunesmith.methods.precision import Precision, pass_tokens

    fp32, bf16 = torch.float32, torch.bfloat16
    for precision, overrides, expected in [(Precision(fp32, None), [], 1024), (Precision(bf16, None), [], 2048),
                                           (Precision(fp32, bf16, weight_copies=True), [], 2048),
                                           (Precision(fp32, bf16), [], 1024),  # autocast: float32 activations remain
                                           (Precision(bf16, None), ["train.batch_tokens=1024"], 1024),  # as asked
                                           (Precision(bf16, None), ["train.batch_tokens=null"], None)]:
        cfg = load_config(None, overrides)
        assert pass_tokens(cfg.train, precision) == expected, (precision, overrides)


def test_weight_copies_run_passes_in_bfloat16_and_sum_their_gradients_in_float32():
    """Full fine-tuning's bfloat16 matmuls (train/precision.py): what the optimizer, evaluation and saving see stays
    float32; each pass's bfloat16 gradient is summed in float32; the copies follow the optimizer's updates."""
    import copy

    from tunesmith.methods.precision import WeightCopies

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    model[0].weight.requires_grad_(False)
    frozen, weights = model[0].weight.detach().clone(), model[1].weight.data
    xs = [torch.randn(4, 8) for _ in range(3)]
    low = copy.deepcopy(model).bfloat16()  # the straightforward computation: each pass in bfloat16, summed in float32
    expected = torch.zeros_like(model[1].weight)
    for x in xs:
        low.zero_grad()
        low(x.bfloat16()).sum().backward()
        expected += low[1].weight.grad.float()
    copies = WeightCopies(model)
    with copies.swapped_in():
        assert model[1].weight.dtype == torch.bfloat16 and model[0].weight.dtype == torch.bfloat16
        for x in xs:
            model(x.bfloat16()).sum().backward()
    assert model[1].weight.data_ptr() == weights.data_ptr() and model[1].weight.grad.dtype == torch.float32
    assert torch.equal(model[1].weight.grad, expected)
    assert model[0].weight.grad is None and torch.equal(model[0].weight, frozen)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()  # float32 update
    with pytest.raises(RuntimeError, match="boom"), copies.swapped_in():
        assert torch.equal(model[1].weight, weights.bfloat16())  # the copy follows the update
        raise RuntimeError("boom")
    assert all(p.dtype == torch.float32 for p in model.parameters())  # restored after an error too


def test_a_bfloat16_lora_run_learns_and_saves_float32_adapters(tmp_path, tiny_model_dir, instruction_file):
    from safetensors.torch import load_file

    res = train(tiny_cfg(tmp_path, tiny_model_dir, instruction_file, "model.dtype=bfloat16"))
    assert res.summary["after"]["eval_loss"] < res.summary["before"]["eval_loss"]
    assert "method: lora, bfloat16 weights" in (res.run_dir / "train.log").read_text()
    saved = load_file(res.run_dir / "final" / "adapter_model.safetensors")
    assert saved and all(t.dtype == torch.float32 for t in saved.values())


def test_existing_run_is_never_overwritten(tmp_path, tiny_model_dir, instruction_file):
    cfg = tiny_cfg(tmp_path, tiny_model_dir, instruction_file, "train.max_steps=1")
    train(cfg)
    with pytest.raises(TunesmithError, match="already exists.*--overwrite"):
        train(cfg)
    train(cfg, overwrite=True)  # a command-line decision (--overwrite), not a config key


def test_saved_adapter_loads_with_plain_peft(tmp_path, tiny_model_dir, instruction_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunesmith.methods.load import load_model

    res = train(tiny_cfg(tmp_path, tiny_model_dir, instruction_file))
    ids = torch.tensor([[1, 5, 9, 20, 33, 40]])
    ours = load_model(res.run_dir / "final", torch.float32).eval()
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), res.run_dir / "final").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        a, b, c = ours(ids).logits, plain(ids).logits, base(ids).logits
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a, c, atol=1e-4)  # the adapter changed something


def test_lora_on_a_lora_run_saves_quietly_and_loads_as_the_chain(tmp_path, tiny_model_dir, instruction_file, recwarn):
    """A run whose base is another LoRA run (SFT, then more LoRA on it): saved without peft looking the base folder up
    (it warned "Could not find a config file"), and loading it gives the second run's model, not the first's."""
    from tunesmith.methods.load import load_model

    first = train(tiny_cfg(tmp_path, tiny_model_dir, instruction_file, "train.max_steps=3", "output.name=first"))
    second = train(tiny_cfg(tmp_path, str(first.run_dir), instruction_file, "train.max_steps=3", "output.name=second"))
    assert not [w for w in recwarn if "Could not find a config file" in str(w.message)]
    ids = torch.tensor([[1, 5, 9, 20, 33, 40]])
    with torch.no_grad():
        a, b = (load_model(r.run_dir / "final", torch.float32).eval()(ids).logits for r in (first, second))
    assert not torch.allclose(a, b, atol=1e-4)


def test_bad_data_leaves_no_run_dir(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    with pytest.raises(TunesmithError, match="bad.jsonl:2: missing field 'output'"):
        train(tiny_cfg(tmp_path, tiny_model_dir, bad))
    assert not (tmp_path / "runs" / "t").exists()


def test_cli_bad_config_is_one_line_and_exit_2(capsys):
    assert main(["train", "train.lrr=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config key 'train.lrr'") and err.count("\n") == 1


def test_cli_sets_native_library_defaults_and_the_users_own_win():
    """oneDNN's kernel cache (bfloat16 training recompiled kernels once 1024 shapes were seen) and OpenMP's wait policy
    are set by the CLI before torch loads; a value already in the environment is kept."""
    import os
    import subprocess
    import sys

    probe = ("import os; import tunesmith.cli.main; "
             "print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'], os.environ['GOMP_SPINCOUNT'])")
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["16384", "1000"]
    env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = "64"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["64", "1000"]


def test_cli_generate_from_run(tmp_path, tiny_model_dir, instruction_file, capsys):
    res = train(tiny_cfg(tmp_path, tiny_model_dir, instruction_file, "train.max_steps=2"))
    capsys.readouterr()
    assert main(["generate", "--run", str(res.run_dir), "hello", "--max-new-tokens", "5"]) == 0
    assert main(["generate", "--model", str(tiny_model_dir), "hello", "--max-new-tokens", "3", "--do-sample"]) == 0


@pytest.mark.parametrize("tracker", ["tensorboard", "mlflow", "wandb"])
def test_trackers_write_offline(tmp_path, tiny_model_dir, instruction_file, monkeypatch, tracker):
    pytest.importorskip({"mlflow": "mlflow", "tensorboard": "tensorboard", "wandb": "wandb"}[tracker])
    monkeypatch.setenv("WANDB_MODE", "offline")
    res = train(tiny_cfg(tmp_path, tiny_model_dir, instruction_file, "train.max_steps=3", f"train.report_to=[{tracker}]"))
    run = res.run_dir
    if tracker == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        ea = EventAccumulator(str(run / "tensorboard"))
        ea.Reload()
        assert [e.step for e in ea.Scalars("loss")] == [1, 2, 3]
        assert "eval_loss" in ea.Tags()["scalars"]
    elif tracker == "mlflow":
        import mlflow
        from tunesmith.run.trackers import mlflow_uri
        client = mlflow.tracking.MlflowClient(mlflow_uri(run))
        (r,) = client.search_runs([client.get_experiment_by_name("tunesmith").experiment_id])
        assert [m.step for m in client.get_metric_history(r.info.run_id, "loss")] == [1, 2, 3]
        assert r.data.params["method.name"] == "lora"
    else:
        assert list((run / "wandb").glob("offline-run-*"))


def test_missing_tracker_package_is_a_clear_error(tmp_path, tiny_model_dir, instruction_file, monkeypatch):
    from tunesmith.run import trackers
    monkeypatch.setitem(trackers.PACKAGES, "wandb", "no_such_package_xyz")
    with pytest.raises(TunesmithError, match="report_to includes wandb, but the no_such_package_xyz package is not installed"):
        train(tiny_cfg(tmp_path, tiny_model_dir, instruction_file, "train.report_to=[wandb]"))
    assert not (tmp_path / "runs").exists()


def test_time_budget_stops_training_at_the_budget_and_then_evaluates_and_saves(tmp_path, tiny_model_dir, instruction_file):
    budget_s = 3.0  # room for >= 3 steps even on a loaded machine (1.5 s gave 1 step while another run used the cores)
    cfg = tiny_cfg(tmp_path, tiny_model_dir, instruction_file, f"train.max_minutes={budget_s / 60}", "train.epochs=1000")
    cfg.train.max_steps = None
    s = train(cfg).summary
    assert 3 <= s["steps"] < 100_000
    assert budget_s * 0.7 <= s["train_seconds"] <= budget_s + 1.0, s["train_seconds"]
    assert s["after"] and s["budget_minutes"] == budget_s / 60 and s["epochs"] > 0
    rows = [json.loads(x) for x in (tmp_path / "runs" / "t" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert lrs[-1] < 0.2 * max(lrs)  # the decay was planned for the budget, not cut off at the peak
