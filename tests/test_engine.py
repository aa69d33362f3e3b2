"""The generation engine (continuous batching): greedy answers are token-identical to model.generate, alone or in a
busy batch; sampling is reproducible with a seed whatever else runs; rows join and leave; a shared prefix is copied;
stop strings, cancellation and several LoRA adapters in one batch."""

import pytest
import torch

from tunesmith.models.engine import BASE, Engine, EngineFull, Request, Sampling
from conftest import make_tiny_llama


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer):
    model = make_tiny_llama(len(tiny_tokenizer), seed=3).eval()
    return model, tiny_tokenizer


PROMPTS = ["Summarize what the function does.", "Return the sum", "hello world, how are you today? " * 3, "def add(a, b):",
           "The quick brown fox", "Question: what is two plus two? Answer:"]


def hf_greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=[2], pad_token_id=2,
                         temperature=None, top_p=None, top_k=None)
    return out[0, len(ids):].tolist()


def test_greedy_is_token_identical_to_model_generate_alone_and_in_a_batch(tiny):
    model, tok = tiny
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    expected = [hf_greedy(model, i, 12) for i in ids]
    alone = [Engine(model, tok).run([Request(i, Sampling(max_new_tokens=12))])[0].output_ids for i in ids]
    together = [r.output_ids for r in Engine(model, tok, max_rows=3, prefill_chunk=7).run(
        [Request(i, Sampling(max_new_tokens=12)) for i in ids])]  # rows join as others leave; prompts in 7-token chunks
    assert alone == expected and together == expected


def test_sampling_is_reproducible_with_a_seed_whatever_else_runs(tiny):
    model, tok = tiny
    ids = tok(PROMPTS[0])["input_ids"]
    s = Sampling(max_new_tokens=10, do_sample=True, temperature=0.9, top_k=20, top_p=0.9, seed=7)
    one = Engine(model, tok).run([Request(ids, s)])[0].output_ids
    crowd = Engine(model, tok).run([Request(tok(p)["input_ids"], Sampling(max_new_tokens=10, do_sample=True, seed=k))
                                    for k, p in enumerate(PROMPTS)] + [Request(ids, s)])
    assert crowd[-1].output_ids == one
    other = Engine(model, tok).run([Request(ids, Sampling(max_new_tokens=10, do_sample=True, temperature=0.9, top_k=20,
                                                           top_p=0.9, seed=8))])[0].output_ids
    assert other != one  # the seed matters
    tiny_t = Engine(model, tok).run([Request(ids, Sampling(max_new_tokens=10, do_sample=True, temperature=1e-40))])[0]
    assert tiny_t.output_ids == hf_greedy(model, ids, 10)  # temperatures below 1e-5 are greedy, never NaN


def test_processors_match_transformers(tiny):
    model, tok = tiny
    ids = tok(PROMPTS[2])["input_ids"]
    for kw in ({"repetition_penalty": 1.5}, {"no_repeat_ngram_size": 2}):
        hf = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=[2], pad_token_id=2,
                            temperature=None, top_p=None, top_k=None, **kw)[0, len(ids):].tolist()
        ours = Engine(model, tok).run([Request(ids, Sampling(max_new_tokens=12, **kw))])[0].output_ids
        assert ours == hf, kw


def test_a_shared_prompt_prefix_is_copied_and_gives_the_same_answers(tiny):
    model, tok = tiny
    system = "Below is an instruction that describes a task. " * 3
    prompts = [tok(system + p)["input_ids"] for p in PROMPTS]
    engine = Engine(model, tok, min_shared_prefix=8)
    moved = []
    real_move = engine.cache.move
    engine.cache.move = lambda src, dst, n: moved.append(n) or real_move(src, dst, n)
    got = [r.output_ids for r in engine.run([Request(p, Sampling(max_new_tokens=8)) for p in prompts])]
    assert got == [hf_greedy(model, p, 8) for p in prompts]
    assert moved and max(moved) >= len(tok(system)["input_ids"]) - 1


def test_stop_strings_streaming_and_cancellation(tiny):
    model, tok = tiny
    ids = tok(PROMPTS[1])["input_ids"]
    full = Engine(model, tok).run([Request(ids, Sampling(max_new_tokens=16))])[0]
    assert len(full.text) > 4
    stop = full.text[2:4]
    pieces = []
    r = Engine(model, tok).run([Request(ids, Sampling(max_new_tokens=16), stop=[stop], on_text=pieces.append)])[0]
    assert r.finish_reason == "stop" and r.text == full.text[:full.text.index(stop)] and "".join(pieces) == r.text
    engine = Engine(model, tok)
    req = Request(ids, Sampling(max_new_tokens=200))
    engine.submit(req)
    engine.step()
    req.cancel()
    engine.step()
    assert req.done and req.finish_reason == "cancelled" and not engine.rows


def test_a_worker_thread_serves_concurrent_requests_and_bounds_its_queue(tiny):
    model, tok = tiny
    engine = Engine(model, tok, max_rows=4, max_waiting=3)
    queued = []
    with pytest.raises(EngineFull):
        for p in PROMPTS:
            queued.append(engine.submit(Request(tok(p)["input_ids"], Sampling(max_new_tokens=4))))
    assert len(queued) == 3
    engine.start()
    try:
        reqs = queued + [engine.submit(Request(tok(p)["input_ids"], Sampling(max_new_tokens=6))) for p in PROMPTS[:2]
                         if all(q.wait(timeout=30) for q in queued)]
        assert len(reqs) == 5 and all(r.wait(timeout=30) for r in reqs) and engine.alive
    finally:
        engine.stop()
    assert not engine.alive


def test_rows_of_several_lora_adapters_run_in_one_batch(tiny, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model, tok = tiny
    paths = {}
    for k, name in enumerate(["a", "b"]):
        torch.manual_seed(k)
        tuned = get_peft_model(make_tiny_llama(len(tok), seed=3), LoraConfig(r=4, lora_alpha=16, target_modules="all-linear",
                                                                            init_lora_weights=False))
        tuned.save_pretrained(tmp_path / name)
        paths[name] = tmp_path / name
    served = PeftModel.from_pretrained(make_tiny_llama(len(tok), seed=3), paths["a"], adapter_name="a")
    served.load_adapter(paths["b"], adapter_name="b")
    served.eval()
    ids = [tok(p)["input_ids"] for p in PROMPTS[:3]]
    mixed = Engine(served, tok).run([Request(i, Sampling(max_new_tokens=8), adapter=a)
                                     for i in ids for a in ("a", "b", BASE)])
    for k, (i, a) in enumerate((i, a) for i in ids for a in ("a", "b", BASE)):
        if a == BASE:
            with served.disable_adapter():
                expected = hf_greedy(served, i, 8)
        else:
            served.set_adapter(a)
            expected = hf_greedy(served, i, 8)
        assert mixed[k].output_ids == expected, (k, a)


def test_the_batched_draw_is_an_exact_draw_from_the_distribution():
    from tunesmith.models.sampling import draw as _draw

    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(1000) * 2, -1)
    u = torch.rand(100_000)
    draws = _draw(probs.expand(len(u), -1).contiguous(), u)
    cdf = probs.cumsum(0)
    by_full_cdf = torch.searchsorted(cdf, (u * cdf[-1]).unsqueeze(-1)).squeeze(-1).clamp(max=999)
    assert (draws == by_full_cdf).float().mean() > 0.999  # the same tokens but at float-rounding boundaries
    assert 0.5 * (torch.bincount(draws, minlength=1000) / len(u) - probs).abs().sum() < 0.03


def test_short_prompts_share_one_prefill_forward_and_a_repeated_prompt_needs_none(tiny):
    model, tok = tiny
    engine = Engine(model, tok, min_shared_prefix=4)
    widths = []
    real = engine._forward
    engine._forward = lambda ids, *a, **kw: widths.append(ids.shape) or real(ids, *a, **kw)
    distinct = [tok(p)["input_ids"] for p in PROMPTS]
    got = engine.run([Request(i, Sampling(max_new_tokens=6)) for i in distinct])
    assert [r.output_ids for r in got] == [hf_greedy(model, i, 6) for i in distinct]
    assert widths[0] == (1, sum(map(len, distinct)))  # every prompt in the first forward, packed side by side
    widths.clear()
    group = [Request(distinct[2], Sampling(max_new_tokens=6, do_sample=True, seed=k)) for k in range(8)]  # RL: 8 of one
    engine.run(group)
    prefills = [w for w in widths if w[0] == 1 and w[1] > 1]
    assert prefills == [(1, len(distinct[2]))]  # the prompt ran once; the other 7 copied its cache and its logits
    assert len({tuple(r.output_ids) for r in group}) > 1
