"""The RL losses and stabilisers, each against a value worked out by hand (the arithmetic is in the comments): the three
loss normalisations, masking truncated completions, entropy and clip ratio as logged, the k3 KL with its coefficient,
GSPO's sequence-level ratio and its gradient, and the penalty for answers that never end (plain and DAPO's soft ramp).

The "model" is a bigram table: the logits at a position are the table's row for the token there, so every
log-probability is a hand-computable log-softmax of a row."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import write_jsonl
from test_train import tiny_cfg
from tunesmith.config import RLConfig
from tunesmith.objectives.rl import Group, OnlineRL, completion_logps, overlong_penalties, surrogate


class Bigram(torch.nn.Module):
    """logits[b, t] = table[ids[b, t]]: P(next | token) = softmax(table[token])."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(table, dtype=torch.float32))

    def get_output_embeddings(self):
        return None  # no plain head: completion_logps runs the forward itself

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.table[input_ids])


LN2, LN3 = math.log(2), math.log(3)
# three tokens; after token 0 the next token is 0, 1, 2 with probabilities 1/6, 2/6, 3/6; after 1 or 2: uniform
TABLE = [[0.0, LN2, LN3], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
H0 = -(1 / 6 * math.log(1 / 6) + 2 / 6 * math.log(2 / 6) + 3 / 6 * math.log(3 / 6))  # 1.011404 nats after token 0


def objective(**rl) -> OnlineRL:
    """An OnlineRL with just what `loss` reads."""
    o = OnlineRL.__new__(OnlineRL)
    o.rl = RLConfig(**{"max_new_tokens": 4, **rl})
    o.pad_id, o.device, o.metrics, o.token_scale = 0, torch.device("cpu"), {}, 1.0
    return o


def one_group(advantages, completions=([2], [1, 2, 2]), truncated=(False, False)) -> Group:
    """Prompt [0]; completion 0 is [2] (one token: P(2 | 0) = 1/2), completion 1 is [1, 2, 2] (1/3 after 0, then 1/3,
    1/3)."""
    return Group(0, [0], [list(c) for c in completions], torch.tensor(truncated), torch.zeros(len(completions)),
                 torch.tensor(advantages, dtype=torch.float32))


def test_bigram_log_probs_and_entropy_by_hand():
    model = Bigram(TABLE)
    ids, mask = one_group([1.0, -0.5]).tensors(0, "cpu")
    logps, entropy = completion_logps(model, ids, 1, mask.shape[1], 1.0, with_entropy=True)
    logps = logps.detach()
    assert float(logps[0, 0]) == pytest.approx(math.log(1 / 2)) and logps[1].tolist() == pytest.approx([math.log(1 / 3)] * 3)
    assert float(entropy[0, 0]) == pytest.approx(H0) and float(entropy[1, 1]) == pytest.approx(math.log(3))


@pytest.mark.parametrize("loss, expected", [
    # first update: ratio 1, so each token's loss is -A: completion 0 (A = +1, 1 token) -1; completion 1 (A = -0.5,
    # 3 tokens) +0.5 each, +1.5 in all
    ("grpo", (-1 / 1 + 1.5 / 3) / 2),        # per completion, then the group's mean: -0.25
    ("dr_grpo", (-1 + 1.5) / (2 * 4)),       # the group's sum / (G x max_new_tokens 4): 0.0625
    ("dapo", (-1 + 1.5) * 0.25),             # the sum x token_scale (prompts / tokens of the step = 1 / 4): 0.125
])
def test_loss_normalisations_by_hand(loss, expected):
    o = objective(loss=loss)
    o.groups, o.token_scale = {0: one_group([1.0, -0.5])}, 1 / 4
    value = o.loss(Bigram(TABLE), None, [0])
    assert float(value) == pytest.approx(expected)
    sums = o.metrics["_sums"]
    # entropy over the 4 completion tokens: after 0 (H0) for each completion's first token, log 3 after 1 and 2
    assert sums["entropy"][0] / sums["entropy"][1] == pytest.approx((2 * H0 + 2 * math.log(3)) / 4)
    assert sums["clip_ratio"] == (0.0, 4.0)   # ratio 1: nothing clipped


def test_mask_truncated_takes_cut_completions_out_of_the_loss():
    # completion 1 cut at the cap: only completion 0's token counts; grpo: (-1 / 1 + 0) / 2; dr_grpo: -1 / (2 x 4)
    for loss, expected in (("grpo", -0.5), ("dr_grpo", -1 / 8)):
        o = objective(loss=loss, mask_truncated=True)
        o.groups = {0: one_group([1.0, -0.5], truncated=(False, True))}
        assert float(o.loss(Bigram(TABLE), None, [0])) == pytest.approx(expected)
        assert o.metrics["_sums"]["entropy"] == (pytest.approx(H0), 1.0)  # one token: the first of completion 0
    o = objective(loss="grpo", mask_truncated=False)
    o.groups = {0: one_group([1.0, -0.5], truncated=(False, True))}
    assert float(o.loss(Bigram(TABLE), None, [0])) == pytest.approx(-0.25)  # unmasked: as above


def test_kl_coefficient_by_hand_on_the_model():
    # reference: P(2 | 0) = 1/4 instead of the policy's 1/2 on completion 0's token; same elsewhere (k3 = 0 there)
    # k3 = exp(ref - logp) - (ref - logp) - 1 = 1/2 - ln(1/2) - 1 = 0.193147; beta 0.5: + 0.096574 on that token
    o = objective(loss="dr_grpo", beta=0.5)
    group = one_group([1.0, -0.5])
    group.ref_logps = torch.log(torch.tensor([[0.25, 1.0, 1.0], [1 / 3, 1 / 3, 1 / 3]]))
    o.groups = {0: group}
    k3 = 0.5 - math.log(0.5) - 1
    assert float(o.loss(Bigram(TABLE), None, [0])) == pytest.approx((-1 + 1.5 + 0.5 * k3) / 8)
    assert o.metrics["_sums"]["kl"] == (pytest.approx(k3), 4.0)


def test_clip_ratio_counts_tokens_whose_gradient_the_clip_stops():
    cfg = RLConfig(epsilon=0.2, epsilon_high=0.28)
    logps = torch.log(torch.tensor([[0.5, 0.5, 0.5]]))
    old = torch.log(torch.tensor([[0.25, 0.5, 1.0]]))   # ratios 2, 1, 0.5
    mask = torch.ones(1, 3, dtype=torch.bool)
    up, stats = surrogate(logps, old, None, torch.tensor([1.0]), mask, cfg)
    # A = +1: -min(r, clip(r, 0.8, 1.28)) = -[1.28, 1, 0.5]; only ratio 2 is held at 1 + eps_high
    assert up[0].tolist() == pytest.approx([-1.28, -1.0, -0.5]) and stats["clipped"] == 1
    down, stats = surrogate(logps, old, None, torch.tensor([-1.0]), mask, cfg)
    # A = -1: -min(-r, -clip(r)) = [2, 1, 0.8]; only ratio 0.5 is held at 1 - eps
    assert down[0].tolist() == pytest.approx([2.0, 1.0, 0.8]) and stats["clipped"] == 1


def test_gspo_sequence_ratio_by_hand():
    logps = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.9]]))
    old = torch.log(torch.tensor([[0.25, 0.5], [0.5, 0.1]]))   # row 0 log-ratios [ln 2, 0]; row 1 [0, (padding)]
    mask = torch.tensor([[True, True], [True, False]])
    adv = torch.tensor([1.0, 1.0])
    seq = RLConfig(importance="sequence", epsilon=0.2, epsilon_high=0.5)
    loss, stats = surrogate(logps, old, None, adv, mask, seq)
    # row 0: exp((ln 2 + 0) / 2) = sqrt 2 = 1.414214 at both tokens (under 1 + 0.5: not clipped); row 1: exp(0 / 1) = 1,
    # its padding left out of the mean
    assert loss[0].tolist() == pytest.approx([-math.sqrt(2)] * 2) and loss[1, 0] == pytest.approx(-1.0)
    assert stats["clipped"] == 0
    tight, stats = surrogate(logps, old, None, adv, mask, RLConfig(importance="sequence", epsilon=0.2))
    assert tight[0].tolist() == pytest.approx([-1.2, -1.2]) and stats["clipped"] == 2   # sqrt 2 held at 1.2, both tokens
    token, _ = surrogate(logps, old, None, adv, mask, RLConfig(importance="token", epsilon=0.2, epsilon_high=0.5))
    assert token[0].tolist() == pytest.approx([-1.5, -1.0])   # per token: ratio 2 held at 1.5, ratio 1


def test_gspo_gradient_by_hand():
    # summed over tokens, within the clip range. Token level: d(-r_t A)/d logp_t = -r_t A. Sequence level: the |y|
    # tokens each carry s = exp(mean_t(logp_t - old_t)), so d(-|y| s A)/d logp_t = -|y| s A / |y| = -s A at every token
    # row 0: ratios 1.1 and 0.9, s = sqrt(1.1 x 0.9) = sqrt(0.99) = 0.994987, A = 2; row 1: one token, ratio 1, A = -1
    logps = torch.log(torch.tensor([[0.55, 0.45], [0.2, 0.7]])).requires_grad_(True)
    old = torch.log(torch.tensor([[0.5, 0.5], [0.2, 0.1]]))
    mask = torch.tensor([[True, True], [True, False]])
    adv = torch.tensor([2.0, -1.0])
    s = math.sqrt(0.99)
    for importance, expected in (("token", [[-2.2, -1.8], [1.0, 0.0]]),
                                 ("sequence", [[-2 * s, -2 * s], [1.0, 0.0]])):
        logps.grad = None
        loss, _ = surrogate(logps, old, None, adv, mask, RLConfig(importance=importance))
        (loss * mask).sum().backward()
        assert logps.grad.tolist() == [pytest.approx(row) for row in expected], importance


def test_overlong_penalties_by_hand():
    lengths = torch.tensor([5.0, 6.0, 8.0, 10.0])
    cut = torch.tensor([False, False, False, True])
    plain = RLConfig(max_new_tokens=10, overlong_penalty=0.5)
    assert overlong_penalties(lengths, cut, plain).tolist() == [0, 0, 0, 0.5]        # only the one cut at the cap
    soft = RLConfig(max_new_tokens=10, overlong_penalty=1.0, overlong_buffer=4)
    # ramp from 10 - 4 = 6 tokens to 10: (len - 6) / 4 clamped to [0, 1] -> [0, 0, 0.5, 1]
    assert overlong_penalties(lengths, cut, soft).tolist() == [0, 0, 0.5, 1.0]
    assert overlong_penalties(lengths, cut, RLConfig(max_new_tokens=10)).tolist() == [0, 0, 0, 0]
    with pytest.raises(Exception, match="overlong_buffer"):
        RLConfig(max_new_tokens=10, overlong_buffer=10)


def test_overlong_penalty_lowers_the_reward_trained_on(tmp_path, tiny_model_dir):
    """The tiny random model never ends within 4 tokens: each completion loses the penalty from the reward it trains on
    (a length reward of 1 for any answer): `reward` = 1 - 0.75 x (share cut) = 0.25 when all are cut."""
    from tunesmith.train.loop import train

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Say something about {i}."} for i in range(20)])
    res = train(tiny_cfg(tmp_path, tiny_model_dir, prompts, "task=rl", "method.name=lora", "train.max_steps=2",
                         "rl.group_size=2", "rl.max_new_tokens=4", "rl.overlong_penalty=0.75", "rl.headroom_samples=0",
                         "rl.rewards=[{kind: length, min_words: 0, max_words: 1000}]"))
    steps = [r for r in (json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()) if "reward" in r]
    for r in steps:
        assert r["rewards/length/mean"] == 1.0
        assert r["overlong_penalty"] == pytest.approx(0.75 * r["clipped_ratio"])
        assert r["reward"] == pytest.approx(1.0 - 0.75 * r["clipped_ratio"])
    assert any(r["clipped_ratio"] > 0 for r in steps)
