"""Deploy: merged HF export equals the adapter model, GGUF round-trips through transformers'
GGUF loader, the Modelfile carries the training prompt format, exports never overwrite."""
import json

import pytest
import torch

from tunesmith.cli.main import main
from tunesmith.methods.load import load_model
from tunesmith.train.loop import train
from test_train import tiny_cfg


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory, wide_tiny_model_dir, instruction_file_module):
    tmp = tmp_path_factory.mktemp("export")
    return train(tiny_cfg(tmp, wide_tiny_model_dir, instruction_file_module, "train.max_steps=8")).run_dir


@pytest.fixture(scope="module")
def instruction_file_module(tmp_path_factory):
    from conftest import write_jsonl
    rows = [{"instruction": f"Summarize what f{i} does.", "output": f"Return the sum of {i} and {i + 1}."} for i in range(40)]
    return write_jsonl(tmp_path_factory.mktemp("d") / "train.jsonl", rows)


IDS = torch.tensor([[1, 5, 9, 20, 33, 40, 41, 42]])


def test_hf_export_equals_the_adapter_model(tuned_run, tmp_path):
    assert main(["export", str(tuned_run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    adapter = load_model(tuned_run / "final", torch.float32, torch.device("cpu")).eval()
    with torch.no_grad():
        assert torch.allclose(merged(IDS).logits, adapter(IDS).logits, atol=1e-5)
    assert (tmp_path / "hf" / "tokenizer_config.json").exists()
    assert main(["export", str(tuned_run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2  # never overwrites


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0"])
def test_gguf_export_is_verified_by_loading_it_back(tuned_run, tmp_path, kind):
    args = ["--quant", "q8_0"] if kind == "q8_0" else ["--dtype", kind]
    assert main(["export", str(tuned_run), "--format", "gguf", *args, "--out", str(tmp_path / "g")]) == 0
    check = json.loads((tmp_path / "g" / "verification.json").read_text())
    assert check["dtype"] == kind
    assert check["passed"]
    if kind == "f32":
        assert check["max_logit_diff"] < 1e-4
    else:
        assert check["max_logit_diff"] < 0.5 and check["mean_kl"] < 0.02
    (gguf_file,) = (tmp_path / "g").glob("*.gguf")
    import gguf
    r = gguf.GGUFReader(gguf_file)
    assert r.fields["general.architecture"].contents() == "llama"
    assert "<|im_start|>" in r.fields["tokenizer.chat_template"].contents()
    assert r.fields["tokenizer.ggml.eos_token_id"].contents() == 2
    modelfile = (tmp_path / "g" / "Modelfile").read_text()
    assert f"FROM ./{gguf_file.name}" in modelfile
    assert "{{ .Prompt }}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile


def test_gguf_verification_fails_for_a_file_that_is_not_the_model(tuned_run, tmp_path, monkeypatch, capsys):
    from tunesmith.export import gguf_file, run
    from tunesmith.export.hf import merged_model

    model, tokenizer = merged_model(tuned_run / "final")
    with torch.no_grad():
        model.model.norm.weight.mul_(30)  # confident next-token distributions, as a trained model has
    path = tmp_path / "m-q8_0.gguf"
    gguf_file.write_gguf(model, tokenizer, path, "q8_0")
    good = gguf_file.verify(model, tokenizer, path, "q8_0")
    with torch.no_grad():  # as if the file had mapped gate and up to each other's names in every block
        for layer in model.model.layers:
            gate = layer.mlp.gate_proj.weight.clone()
            layer.mlp.gate_proj.weight.copy_(layer.mlp.up_proj.weight)
            layer.mlp.up_proj.weight.copy_(gate)
    bad = gguf_file.verify(model, tokenizer, path, "q8_0")
    assert good["passed"] and not bad["passed"], (good, bad)
    monkeypatch.setattr(run, "verify", lambda *a: bad)  # the CLI refuses to call such a file an export
    assert main(["export", str(tuned_run), "--format", "gguf", "--quant", "q8_0", "--out", str(tmp_path / "bad")]) == 2
    assert "do not deploy" in capsys.readouterr().err  # kept beside the deploy path to inspect, never at it
    assert (tmp_path / "bad.rejected" / "verification.json").exists() and not (tmp_path / "bad").exists()


def test_adapter_export_has_a_card(tuned_run, tmp_path):
    assert main(["export", str(tuned_run), "--format", "adapter", "--out", str(tmp_path / "a")]) == 0
    card = (tmp_path / "a" / "README.md").read_text()
    assert "method `lora`" in card and "| loss |" in card
    assert "AutoPeftModelForCausalLM.from_pretrained('<this folder>')" in card
    assert (tmp_path / "a" / "adapter_model.safetensors").exists()


def test_unmergeable_and_unsupported_exports_are_clear_errors(tmp_path, tiny_model_dir, instruction_file, capsys):
    run = train(tiny_cfg(tmp_path, tiny_model_dir, instruction_file, "method.name=prompt-tuning", "train.max_steps=2")).run_dir
    assert main(["export", str(run), "--format", "hf"]) == 2
    assert "cannot be merged" in capsys.readouterr().err
