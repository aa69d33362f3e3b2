"""Every method on a tiny random Llama: it trains exactly the parameters it promises, lowers the
held-out loss at its default learning rate, and its saved output reloads to the same model."""
import pytest
import torch

from tunesmith.catalog import METHOD_NAMES, METHODS
from tunesmith.config import MethodConfig
from tunesmith.errors import TunesmithError
from tunesmith.methods import get_method, quantization
from tunesmith.methods.load import load_model
from tunesmith.train.loop import train
from test_train import tiny_cfg

# what the trainable parameter names must contain, per method
PROMISE = {"lora": "lora_", "qlora": "lora_", "lora-int8": "lora_", "ia3": "ia3_", "prompt-tuning": "prompt_encoder",
           "prefix-tuning": "prompt_encoder", "adapters": ("down", "up")}
QUANTIZED = {name for name, spec in METHODS.items() if spec.quantized_bits}
ON_LLAMA = [name for name in METHOD_NAMES if name != "bitfit"]  # BitFit needs bias terms, which Llama has none of


def test_every_method_on_llama_but_full_fine_tuning_states_what_it_trains():
    assert sorted(PROMISE) == sorted(name for name in ON_LLAMA if name != "full")


def build(name, model_dir, **kw):
    cfg = MethodConfig(name=name, **kw)
    method = get_method(name)
    model = load_model(model_dir, torch.float32, torch.device("cpu"), quantization=quantization(method, cfg, torch.float32))
    return method, cfg, method.apply(model, cfg)


@pytest.mark.parametrize("name", list(PROMISE))
def test_trains_only_what_it_promises_and_reloads(tmp_path, wide_tiny_model_dir, tiny_tokenizer, name):
    method, cfg, model = build(name, wide_tiny_model_dir)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    promise = PROMISE[name] if isinstance(PROMISE[name], tuple) else (PROMISE[name],)
    assert all(any(w in n for w in promise) for n in trainable), trainable
    with torch.no_grad():  # stand-in for training: every trainable tensor moves
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    method.save(model, tiny_tokenizer, tmp_path, cfg)
    reloaded = load_model(tmp_path, torch.float32, torch.device("cpu")).eval()
    ids = torch.tensor([[1, 5, 9, 20, 33, 40, 41, 42]])
    with torch.no_grad():
        a, b = model.eval()(input_ids=ids).logits, reloaded(input_ids=ids).logits
    if name in QUANTIZED:  # reloaded on the de-quantized base: close, not equal
        assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.95
    else:
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("name", ["qlora", "ia3", "prompt-tuning", "prefix-tuning", "adapters"])
def test_default_learning_rate_lowers_heldout_loss(tmp_path, wide_tiny_model_dir, instruction_file, name):
    cfg = tiny_cfg(tmp_path, wide_tiny_model_dir, instruction_file, f"method.name={name}", "train.max_steps=15")
    cfg.train.lr = None  # the method's own default
    s = train(cfg).summary
    assert s["after"]["eval_loss"] < s["before"]["eval_loss"], (s["before"], s["after"])


def test_bitfit_on_a_model_without_biases_is_a_clear_error(wide_tiny_model_dir):
    with pytest.raises(TunesmithError, match="bitfit trains bias terms, and LlamaForCausalLM has none"):
        build("bitfit", wide_tiny_model_dir)


def test_qlora_base_is_4bit_and_adapter_is_full_precision(wide_tiny_model_dir):
    import bitsandbytes as bnb

    _, _, model = build("qlora", wide_tiny_model_dir)
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(q.base_layer, bnb.nn.Linear4bit) and q.base_layer.weight.quant_type == "nf4"
    assert q.lora_A["default"].weight.dtype == torch.float32


@pytest.mark.parametrize("optimizer", ["adamw8bit", "paged_adamw8bit"])
def test_8bit_and_paged_optimizers(tmp_path, wide_tiny_model_dir, instruction_file, capsys, optimizer):
    s = train(tiny_cfg(tmp_path, wide_tiny_model_dir, instruction_file, f"train.optimizer={optimizer}")).summary
    assert s["after"]["eval_loss"] < s["before"]["eval_loss"]
    if optimizer.startswith("paged_") and not torch.cuda.is_available():
        assert "paging needs a GPU; using adamw8bit on CPU" in capsys.readouterr().out


def test_qlora_gradients_are_the_same_after_an_eval_mode_forward(wide_tiny_model_dir):
    """Regression: bitsandbytes repacked 4-bit CPU weights on an eval-mode forward, corrupting later gradients."""
    ids = torch.tensor([[1, 5, 9, 20, 33, 40, 41, 42]])
    norms = []
    for evaluate_first in (False, True):
        torch.manual_seed(0)
        _, _, model = build("qlora", wide_tiny_model_dir)
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        norms.append(torch.sqrt(sum(p.grad.norm() ** 2 for p in model.parameters() if p.grad is not None)))
    assert torch.allclose(norms[0], norms[1], rtol=1e-4), norms


def test_prefix_init_from_text_equals_that_text_in_front(wide_tiny_model_dir, tiny_tokenizer):
    """At step 0 a text-initialised prefix must act exactly like the init text prepended to the input."""
    from transformers import AutoModelForCausalLM
    _, cfg, model = build("prefix-tuning", wide_tiny_model_dir, virtual_tokens=6, prompt_init_text="hello world")
    base = AutoModelForCausalLM.from_pretrained(wide_tiny_model_dir).eval()
    init = tiny_tokenizer("hello world", add_special_tokens=False)["input_ids"]
    init = (init * 6)[:6]
    x = [5, 9, 20, 33]
    with torch.no_grad():
        with_prefix = model.eval()(input_ids=torch.tensor([x])).logits[0, -len(x):]
        with_text = base(input_ids=torch.tensor([init + x])).logits[0, -len(x):]
    assert torch.allclose(with_prefix, with_text, atol=1e-4)


def test_before_training_metrics_are_the_base_models_for_every_method(tmp_path, wide_tiny_model_dir, instruction_file):
    befores = {}
    for name in ("lora", "prompt-tuning", "prefix-tuning"):
        cfg = tiny_cfg(tmp_path, wide_tiny_model_dir, instruction_file, f"method.name={name}", "train.max_steps=1",
                       f"output.name={name}", "eval.samples=0")
        befores[name] = train(cfg).summary["before"]["eval_loss"]
    assert befores["prompt-tuning"] == pytest.approx(befores["lora"], abs=1e-4)
    assert befores["prefix-tuning"] == pytest.approx(befores["lora"], abs=1e-4)


@pytest.mark.parametrize("name", ["full", "lora", "qlora"])
def test_frozen_first_blocks_train_nothing_and_backward_stops_above_them(wide_tiny_model_dir, name):
    _, _, model = build(name, wide_tiny_model_dir, freeze_layers=1)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not [n for n in trainable if ".layers.0." in n], trainable
    assert [n for n in trainable if ".layers.1." in n], trainable
    blocks = model.get_base_model().model.layers if name != "full" else model.model.layers
    seen = {}
    blocks[0].register_forward_hook(lambda mod, inp, out: seen.update(first=(out[0] if isinstance(out, tuple) else out).requires_grad))
    model.train()(input_ids=torch.tensor([[1, 5, 9, 20]]), labels=torch.tensor([[1, 5, 9, 20]])).loss.backward()
    assert seen == {"first": False}  # no graph below the first trained block: backward skips it


def test_freeze_layers_errors_name_the_key(wide_tiny_model_dir):
    with pytest.raises(TunesmithError, match="freeze_layers=2 leaves no block for LoRA: this model has 2 blocks"):
        build("lora", wide_tiny_model_dir, freeze_layers=2)
    from tunesmith.config import check_combinations, load_config
    with pytest.raises(TunesmithError, match="method.freeze_layers is not built for method.name=ia3"):
        check_combinations(load_config(None, ["method.name=ia3", "method.freeze_layers=1"]))


def test_loraplus_trains_the_b_matrices_at_the_ratio(tmp_path, tiny_model_dir, instruction_file):
    """One AdamW step moves every weight with a gradient by about its rate (the first step is rate x sign of the
    gradient), and LoRA's B starts at zero: after it the largest |B| is the B matrices' rate."""
    from safetensors.torch import load_file

    from tunesmith.config import check_combinations, load_config

    def largest_b(*extra):
        run = train(tiny_cfg(tmp_path / str(len(extra)), tiny_model_dir, instruction_file, "method.name=lora",
                             "train.max_steps=1", "train.lr=1e-3", *extra)).run_dir
        weights = load_file(run / "final" / "adapter_model.safetensors")
        return max(float(w.abs().max()) for k, w in weights.items() if "lora_B" in k)

    assert largest_b() == pytest.approx(1e-3, rel=1e-3)
    assert largest_b("method.loraplus_lr_ratio=8") == pytest.approx(8e-3, rel=1e-3)
    with pytest.raises(TunesmithError, match="method.loraplus_lr_ratio sets the rate of LoRA's B matrices"):
        check_combinations(load_config(None, ["method.name=ia3", "method.loraplus_lr_ratio=4"]))


@pytest.mark.parametrize("method", ON_LLAMA)
def test_every_method_learns_under_bfloat16_autocast(tmp_path, tiny_model_dir, instruction_file, method):
    """train.mixed_precision=bf16 over float32 weights: each method's own layers meet bfloat16 activations
    (LoRA's one-GEMM layer crashed in backward before it handed over to peft's)."""
    s = train(tiny_cfg(tmp_path, tiny_model_dir, instruction_file, f"method.name={method}", "model.dtype=float32",
                       "train.mixed_precision=bf16", "train.max_steps=3")).summary
    assert s["mixed_precision"] == "bf16" and s["after"]["eval_loss"] < s["before"]["eval_loss"]
