"""The optimised loss path computes the same loss and gradients as the straightforward one."""
import pytest
import torch
import torch.nn.functional as F

from tunesmith.config import MethodConfig
from tunesmith.data.batching import collate, epoch_plan
from tunesmith.data.render import IGNORE, Tokenized
from tunesmith.methods import lora
from tunesmith.models import heads as loss_mod
from tunesmith.models.heads import LinearCrossEntropy, reference_sum_loss, sum_loss
from conftest import make_tiny_llama
import numpy as np


def _examples(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).numpy().astype(np.int32)
        labels = ids.copy()
        labels[: n // 2] = IGNORE  # a prompt
        out.append(Tokenized(ids, labels))
    return out


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_linear_cross_entropy_matches_autograd(monkeypatch, smoothing):
    monkeypatch.setattr(loss_mod, "CHUNK", 7)  # several chunks, one ragged
    torch.manual_seed(0)
    h = torch.randn(20, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (20,))
    ours = LinearCrossEntropy.apply(h, w, t, smoothing) * 0.5
    ours.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy(h @ w.T, t, reduction="sum", label_smoothing=smoothing) * 0.5
    ref.backward()
    assert torch.allclose(ours, ref) and torch.allclose(gh, h.grad) and torch.allclose(gw, w.grad)


def test_label_smoothing_trains_on_smoothed_targets_and_evaluates_plain():
    model = _lora_model()
    batch = collate(_examples(120, [9, 17, 12]), pad_id=2)
    smoothed = sum_loss(model, batch.input_ids, batch.labels, label_smoothing=0.2)
    ref = reference_sum_loss(model, batch.input_ids, batch.labels, label_smoothing=0.2)
    plain = reference_sum_loss(model, batch.input_ids, batch.labels)
    assert abs(float(smoothed) - float(ref)) < 1e-4 * float(ref) and abs(float(smoothed) - float(plain)) > 1e-2
    with torch.no_grad():  # held-out evaluation: plain cross-entropy whatever the training smoothing
        evaluated = sum_loss(model, batch.input_ids, batch.labels, label_smoothing=0.2)
    assert abs(float(evaluated) - float(plain)) < 1e-4 * float(plain)


def _tiny_gemma3(vocab_size: int):
    """Gemma 3's layout: sliding-window layers (a 16-token window here) between full-attention ones, scaled embeddings."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    return Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=16, layer_types=["sliding_attention", "sliding_attention",
        "full_attention"], max_position_embeddings=256, pad_token_id=2))


def _lora_model(make=make_tiny_llama):
    model = lora.apply(make(120), MethodConfig(r=4, alpha=8))
    for n, p in model.named_parameters():  # make B non-zero so the adapter matters
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    return model


def _assert_equals_reference(model, batch, ours, rel: float) -> None:
    """`ours` (sum_loss on `batch`, not yet backpropagated) and its adapter gradients equal the plain computation's."""
    ours.backward()
    g_ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    ref = reference_sum_loss(model, batch.input_ids, batch.labels)
    ref.backward()
    assert abs(float(ours) - float(ref)) < rel * float(ref)
    for n, p in model.named_parameters():
        if p.requires_grad:
            scale = max(1.0, float(p.grad.abs().max()))  # float32 rounding grows with the gradients' size
            assert torch.allclose(g_ours[n], p.grad, atol=1e-6 * scale, rtol=1e-4), n


def test_fast_path_equals_reference_with_lora_and_padding():
    model = _lora_model()
    batch = collate(_examples(120, [9, 17, 12]), pad_id=2)
    _assert_equals_reference(model, batch, sum_loss(model, batch.input_ids, batch.labels), 1e-4)


def test_soft_capped_logits_take_the_model_forward():
    """Gemma 2 caps its logits with tanh after the head: the loss must be that of its capped logits, not of h @ W.T."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, final_logit_softcapping=1.0 / 3, initializer_range=0.5,
                       pad_token_id=2)
    model = Gemma2ForCausalLM(cfg)
    batch = collate(_examples(120, [9, 17]), pad_id=2)
    assert loss_mod.split_model(model) is None
    capped = float(reference_sum_loss(model, batch.input_ids, batch.labels))
    assert abs(float(sum_loss(model, batch.input_ids, batch.labels)) - capped) < 1e-5 * capped
    cfg.final_logit_softcapping = None  # the same weights, uncapped: what h @ W.T would have given
    assert abs(float(reference_sum_loss(model, batch.input_ids, batch.labels)) - capped) > 0.05 * capped


def test_right_padding_without_mask_is_exact():
    """Each example's loss in a padded batch (no attention mask) equals its loss alone."""
    model = make_tiny_llama(120).eval()
    exs = _examples(120, [5, 16, 11])
    batch = collate(exs, pad_id=2)
    with torch.no_grad():
        together = float(sum_loss(model, batch.input_ids, batch.labels))
        alone = sum(float(sum_loss(model, b.input_ids, b.labels)) for b in (collate([e], 2) for e in exs))
    assert abs(together - alone) < 1e-4


def test_full_finetune_head_gradient_matches():
    model = make_tiny_llama(120)
    batch = collate(_examples(120, [8, 13]), pad_id=2)
    sum_loss(model, batch.input_ids, batch.labels).backward()
    g = model.get_input_embeddings().weight.grad.clone()  # tied: embedding + head contributions
    model.zero_grad()
    reference_sum_loss(model, batch.input_ids, batch.labels).backward()
    assert torch.allclose(g, model.get_input_embeddings().weight.grad, atol=1e-6, rtol=1e-4)


def test_epoch_plan_covers_every_example_once_and_groups_lengths():
    lengths = list(np.random.default_rng(0).integers(10, 500, size=1000))
    plan = epoch_plan(lengths, 8, seed=1, epoch=0)
    flat = sorted(i for b in plan for i in b)
    assert flat == list(range(1000))
    assert plan == epoch_plan(lengths, 8, seed=1, epoch=0) != epoch_plan(lengths, 8, seed=1, epoch=1)
    pad = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in plan)
    assert pad / sum(lengths) < 0.05


def test_collate_drops_tail_after_last_label():
    ids = np.arange(3, 13, dtype=np.int32)
    labels = ids.copy()
    labels[:4] = IGNORE
    labels[8:] = IGNORE  # e.g. a newline after the end-of-turn token
    b = collate([Tokenized(ids, labels)], pad_id=2)
    assert b.input_ids.shape == (1, 8) and b.label_tokens == 4


def _merged_and_stock_lora():
    """The same LoRA model twice: with our merged layer and with peft's stock layer (B non-zero)."""
    from peft import LoraConfig, get_peft_model

    ours = lora.apply(make_tiny_llama(120), MethodConfig(r=4, alpha=8))
    stock = get_peft_model(make_tiny_llama(120), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                            target_modules="all-linear", task_type="CAUSAL_LM"))
    assert type(ours.base_model.model.model.layers[0].mlp.up_proj).__name__ == "MergedLoraLinear"
    assert type(stock.base_model.model.model.layers[0].mlp.up_proj).__name__ == "Linear"
    torch.manual_seed(1)
    for (n, p), (n2, p2) in zip(ours.named_parameters(), stock.named_parameters()):
        assert n == n2
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
        p2.data.copy_(p.data)
    return ours, stock


def test_merged_lora_layer_matches_stock_peft():
    """Our one-GEMM LoRA layer computes what peft's layer computes: loss and every adapter gradient."""
    batch = collate(_examples(120, [9, 14]), pad_id=2)
    ours, stock = _merged_and_stock_lora()
    results = []
    for model in (ours, stock):
        loss = reference_sum_loss(model, batch.input_ids, batch.labels)
        loss.backward()
        results.append((float(loss), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert abs(results[0][0] - results[1][0]) < 1e-5 * results[1][0]
    for n, g in results[0][1].items():
        assert torch.allclose(g, results[1][1][n], atol=1e-6, rtol=1e-4), n


def test_merged_lora_layer_on_a_bfloat16_base_keeps_float32_adapters(monkeypatch):
    """A bfloat16 base (fast on CPUs with AMX) with peft's float32 adapters takes the one-GEMM path too (it used to fall
    back to peft's layer over the dtype mismatch): the adapters and their gradients stay float32 and match peft's layer
    to bfloat16 precision."""
    from peft import LoraConfig, get_peft_model

    calls = []
    real = lora._MergedLoraFunction.apply
    monkeypatch.setattr(lora._MergedLoraFunction, "apply", lambda *a: calls.append(1) or real(*a))
    ours = lora.apply(make_tiny_llama(120).to(torch.bfloat16), MethodConfig(r=4, alpha=8))
    stock = get_peft_model(make_tiny_llama(120).to(torch.bfloat16), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    for (n, p), (_, p2) in zip(ours.named_parameters(), stock.named_parameters()):
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
        p2.data.copy_(p.data)
    batch = collate(_examples(120, [9, 14]), pad_id=2)
    results = []
    for model in (ours, stock):
        loss = reference_sum_loss(model, batch.input_ids, batch.labels)
        loss.backward()
        results.append((float(loss), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert calls, "the bfloat16 base fell back to peft's layer"
    assert abs(results[0][0] - results[1][0]) < 0.02 * results[1][0]
    for n, g in results[0][1].items():
        assert g.dtype == torch.float32, n
        assert F.cosine_similarity(g.flatten(), results[1][1][n].flatten(), dim=0) > 0.99, n


def test_kept_merged_weight_follows_every_update():
    """The merged weight kept between updates is rebuilt after fused AdamW steps (which leave the tensors'
    version counters alone), after weights are loaded, and not used when keeping is off."""
    from tunesmith.train.distributed import full_weights, set_weights

    ours, stock = _merged_and_stock_lora()
    first = full_weights(ours)
    batch = collate(_examples(120, [9, 14, 6]), pad_id=2)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, fused=True) for m in (ours, stock)]

    def losses(backward: bool) -> list[float]:
        out = []
        for model in (ours, stock):
            with torch.set_grad_enabled(backward):
                loss = reference_sum_loss(model, batch.input_ids, batch.labels)
            if backward:
                loss.backward()
            out.append(float(loss))
        return out

    for _ in range(3):
        a, b = losses(backward=False)  # an eval forward between updates builds (and keeps) the merged weight
        assert abs(a - b) < 1e-5 * b
        a, b = losses(backward=True)
        assert abs(a - b) < 1e-5 * b
        for opt in opts:
            opt.step()
            opt.zero_grad()
    kept = [m for m in ours.modules() if isinstance(m, lora.MergedLoraLinear)]
    assert all(m._merged is not None for m in kept)
    set_weights(ours, first)
    set_weights(stock, first)
    a, b = losses(backward=False)
    assert abs(a - b) < 1e-5 * b
    lora.keep_merged(ours, False)
    a, b = losses(backward=True)
    assert abs(a - b) < 1e-5 * b and all(m._merged is None for m in kept)


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = collate(_examples(120, [9, 14]), pad_id=2)
    grads = []
    for checkpointing in (False, True):
        model = lora.apply(make_tiny_llama(120), MethodConfig(r=4, alpha=8))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.constant_(p, 0.01)
        if checkpointing:
            model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        sum_loss(model, batch.input_ids, batch.labels).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_split_passes_respects_the_token_budget_and_covers_the_step():
    from tunesmith.data.batching import split_passes

    lengths = [50, 60, 100, 120, 300, 310, 500, 520]
    step = list(range(8))  # sorted by length, as epoch_plan gives them
    passes = split_passes(step, lengths, micro_batch_size=8, batch_tokens=1024)
    assert sorted(i for p in passes for i in p) == step
    assert all(max(lengths[i] for i in p) * len(p) <= 1024 or len(p) == 1 for p in passes)
    assert passes == [[0, 1, 2, 3], [4, 5], [6], [7]]  # short ones share a pass, long ones split
    assert split_passes(step, lengths, micro_batch_size=4, batch_tokens=None) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert split_passes(step, lengths, micro_batch_size=3, batch_tokens=1024) == [[0, 1, 2], [3, 4, 5], [6], [7]]


def test_token_budget_does_not_change_the_step_gradient():
    """Splitting a step into more passes changes memory, not the result (loss normalised by the step's labels)."""
    from tunesmith.data.batching import split_passes

    exs = _examples(120, [6, 9, 12, 15, 20, 25])
    lengths = [len(e.input_ids) for e in exs]
    grads = []
    for budget in (None, 40):
        model = make_tiny_llama(120)
        passes = [collate([exs[i] for i in p], 2) for p in split_passes(list(range(6)), lengths, 6, budget)]
        n = sum(b.label_tokens for b in passes)
        for b in passes:
            (sum_loss(model, b.input_ids, b.labels) / n).backward()
        grads.append(model.model.layers[0].mlp.up_proj.weight.grad.clone())
    assert len(split_passes(list(range(6)), lengths, 6, 40)) > 1
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("make", [make_tiny_llama, _tiny_gemma3], ids=["llama", "gemma3-sliding-window"])
def test_shared_prompt_prefix_gives_the_same_loss_and_gradients(make):
    """Rows that start with the same 50 tokens: the prefix runs once (a second, shorter backbone call), and the loss
    and LoRA gradients are those of the full computation (also where the prefix is longer than a sliding window)."""
    model = _lora_model(make)
    exs = _examples(120, [110, 121, 106, 115])
    for t in exs[1:]:
        t.input_ids[:50] = exs[0].input_ids[:50]
    batch = collate(exs, pad_id=2)
    assert loss_mod.shared_prefix_length(batch.input_ids) == 50
    calls = []
    hook = model.get_base_model().model.register_forward_hook(lambda m, a, k, out: calls.append(1), with_kwargs=True)
    ours = sum_loss(model, batch.input_ids, batch.labels)
    hook.remove()
    assert len(calls) == 2  # prefix, then the rows
    _assert_equals_reference(model, batch, ours, 1e-5)


def test_shared_prefix_length_leaves_one_token_and_needs_two_rows():
    ids = torch.tensor([[5, 6, 7], [5, 6, 7]])
    assert loss_mod.shared_prefix_length(ids) == 2
    assert loss_mod.shared_prefix_length(ids[:1]) == 0
    assert loss_mod.shared_prefix_length(torch.tensor([[5, 6], [4, 6]])) == 0
