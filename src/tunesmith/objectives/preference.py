"""Preference tuning (DPO, with IPO and hinge variants; SimPO and ORPO) on prompt/chosen/rejected pairs.

A batch holds the chosen rows then the rejected rows (data/batching.py). The policy's log-prob of a
response is the sum over its trained tokens. The reference model is the model as it was before
training (the frozen base, or the tuned run you started from): its log-probs for every pair are
computed once before the first step and kept (two floats per pair), which needs no second model in
memory and gives exactly what an on-the-fly frozen reference would.

    h = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))
    sigmoid (DPO):  -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)     (eps = label smoothing)
    ipo:            (h - 1 / (2 beta))^2
    hinge:          max(0, 1 - beta h)

`dpo.sft_weight` w > 0 adds w x the chosen answer's mean per-token negative log-likelihood to each pair's
loss (RPO; TRL's `rpo_alpha`): DPO alone lowers both answers' likelihoods, the term keeps the chosen one up.

Two losses need no reference model (no reference pass, so a step costs less); with a = an answer's mean
per-token log-prob (its log-prob / its trained tokens):

    simpo (SimPO, Meng et al. 2024):  -log sigma(beta (a_chosen - a_rejected) - gamma)
    orpo (ORPO, Hong et al. 2024):    -a_chosen - beta log sigma(log odds(chosen) - log odds(rejected)),
                                      log odds = a - log(1 - exp(a))
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tunesmith.data.batching import collate
from tunesmith.data.render import Tokenized
from tunesmith.models.heads import label_logits, label_positions
from tunesmith.objectives import Context, Objective


def sequence_logprobs(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(rows,) summed log-prob of each row's trained tokens; the vocabulary head runs only where labels are."""
    logits, targets = label_logits(model, input_ids, labels)
    mask, _ = label_positions(labels)
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(mask)[mask]
    token_logp = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    return torch.zeros(labels.shape[0], dtype=token_logp.dtype, device=labels.device).index_add(0, rows, token_logp)


def pair_logprobs(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    logp = sequence_logprobs(model, batch.input_ids, batch.labels)
    half = logp.shape[0] // 2
    return logp[:half], logp[half:]


def dpo_losses(pol_c, pol_r, ref_c, ref_r, beta: float, kind: str = "sigmoid", label_smoothing: float = 0.0) -> torch.Tensor:
    h = (pol_c - ref_c) - (pol_r - ref_r)
    if kind == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if kind == "hinge":
        return torch.relu(1 - beta * h)
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


REFERENCE_FREE = ("simpo", "orpo")
DEFAULT_BETA = {"simpo": 2.0}  # every other loss: 0.1


def beta_of(cfg) -> float:
    return cfg.beta if cfg.beta is not None else DEFAULT_BETA.get(cfg.loss, 0.1)


def reference_free_losses(pol_c, pol_r, len_c, len_r, beta: float, kind: str, gamma: float = 0.0) -> torch.Tensor:
    """Per pair, from the summed log-probs and trained-token counts of (chosen, rejected) (module docstring)."""
    mean_c, mean_r = pol_c / len_c, pol_r / len_r
    if kind == "simpo":
        return -F.logsigmoid(beta * (mean_c - mean_r) - gamma)

    def log_odds(a):  # log(p / (1 - p)) of p = exp(a); expm1 keeps 1 - p exact for p near 0
        return a - torch.log(-torch.expm1(a.clamp(max=-1e-6)))

    return -mean_c - beta * F.logsigmoid(log_odds(mean_c) - log_odds(mean_r))


def pair_losses(pol_c, pol_r, ref, len_c, len_r, cfg) -> torch.Tensor:
    """Per pair, the configured preference loss (`ref`: (n, 2) reference log-probs; None for the reference-free ones)."""
    if cfg.loss in REFERENCE_FREE:
        return reference_free_losses(pol_c, pol_r, len_c, len_r, beta_of(cfg), cfg.loss, cfg.simpo_gamma)
    return dpo_losses(pol_c, pol_r, ref[:, 0], ref[:, 1], beta_of(cfg), cfg.loss, cfg.label_smoothing)


@torch.no_grad()
def reference_logprobs(model, pairs: list[Tokenized], pad_id: int, batch_size: int = 1) -> torch.Tensor:
    """(n, 2): log-probs of (chosen, rejected) for every pair under the model as it is now. One pair per pass
    by default, as in training: its two answers share the prompt's computation and nothing is padded."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    out = torch.zeros(len(pairs), 2, dtype=torch.float64)
    for s in range(0, len(pairs), batch_size):
        c, r = pair_logprobs(model, collate(pairs[s:s + batch_size], pad_id, device))
        out[s:s + len(c), 0], out[s:s + len(c), 1] = c.double().cpu(), r.double().cpu()
    model.train(was)
    return out


def dpo_sum_loss(model, batch, ref: torch.Tensor | None, cfg) -> torch.Tensor:
    """Summed loss over the batch's pairs (normalise by the step's pair count outside); `ref` rows match the batch
    (None for the reference-free losses)."""
    pol_c, pol_r = pair_logprobs(model, batch)
    tokens = (batch.labels != -100).sum(1).clamp(min=1).to(pol_c.dtype)
    len_c, len_r = tokens[:len(pol_c)], tokens[len(pol_c):]
    ref = ref.to(pol_c.device, pol_c.dtype) if ref is not None else None
    loss = pair_losses(pol_c, pol_r, ref, len_c, len_r, cfg)
    if cfg.sft_weight:
        loss = loss - cfg.sft_weight * pol_c / len_c
    return loss.sum()


@torch.no_grad()
def preference_metrics(model, pairs: list[Tokenized], ref: torch.Tensor, pad_id: int, cfg) -> dict:
    """Held-out DPO loss, rewards, reward margin and accuracy of `model` against the reference log-probs `ref`,
    plus its two accuracies on its own (see `preference_scores`)."""
    if not pairs:
        return {}
    return preference_scores(reference_logprobs(model, pairs, pad_id), pairs, cfg, ref)


def preference_scores(now: torch.Tensor, pairs: list[Tokenized], cfg, ref: torch.Tensor | None = None) -> dict:
    """From (n, 2) log-probs of (chosen, rejected): two preference accuracies of the model on its own, comparable
    between the base and a tuned model -- the chosen answer has the higher log-prob (`eval_seq_logp_accuracy`, the
    sequence likelihood DPO's reward is built on) or the higher log-prob per token (`eval_logp_accuracy`, blind
    to answer length). With the reference log-probs `ref`: the DPO loss, rewards, reward margin and reward accuracy
    (margin > 0, ties count half). The reference-free losses have those without `ref`: their reward is beta x the
    answer's mean per-token log-prob."""
    out = {}
    lengths = _answer_lengths(pairs, now.dtype)
    if ref is not None or cfg.loss in REFERENCE_FREE:
        beta = beta_of(cfg)
        if cfg.loss in REFERENCE_FREE:
            rc, rr = beta * now[:, 0] / lengths[:, 0], beta * now[:, 1] / lengths[:, 1]
        else:
            rc, rr = beta * (now[:, 0] - ref[:, 0]), beta * (now[:, 1] - ref[:, 1])
        margin = rc - rr
        loss = pair_losses(now[:, 0], now[:, 1], ref, lengths[:, 0], lengths[:, 1], cfg)
        out = {"eval_loss": round(float(loss.mean()), 5), "eval_reward_chosen": round(float(rc.mean()), 5),
               "eval_reward_rejected": round(float(rr.mean()), 5), "eval_reward_margin": round(float(margin.mean()), 5),
               "eval_reward_accuracy": round(float(((margin > 0).double() + 0.5 * (margin == 0).double()).mean()), 5)}
    return {**out, "eval_logp_accuracy": round(float(prefers_chosen(now, pairs, True).double().mean()), 5),
            "eval_seq_logp_accuracy": round(float(prefers_chosen(now, pairs, False).double().mean()), 5), "eval_pairs": len(pairs)}


def prefers_chosen(logp: torch.Tensor, pairs: list[Tokenized], per_token: bool) -> torch.Tensor:
    """Per pair, from (n, 2) log-probs of (chosen, rejected): does the chosen answer have the higher log-prob, in
    total or per token (blind to answer length)?"""
    if per_token:
        logp = logp / _answer_lengths(pairs, logp.dtype)
    return logp[:, 0] > logp[:, 1]


def _answer_lengths(pairs: list[Tokenized], dtype) -> torch.Tensor:
    """(n, 2) trained tokens of (chosen, rejected), at least 1."""
    return torch.tensor([[float((t.labels != -100).sum()), float((t.rejected.labels != -100).sum())] for t in pairs],
                        dtype=dtype).clamp(min=1)


class Preference(Objective):
    """Pairs as passes of their own: a pair's two answers share the prompt's computation and nothing is padded. The
    reference is the model before training: its held-out log-probs are taken once, before the base is measured; its
    training log-probs once too (two floats per pair), except with an adapter, where the reference is the same model
    with the adapter switched off, computed per pass (no second model in memory, no pass over the whole split)."""

    task = "dpo"
    examples_per_pass = 1

    def __init__(self, cfg, data, tokenizer):
        super().__init__(cfg, data, tokenizer)
        self.reference_free = cfg.dpo.loss in REFERENCE_FREE  # simpo, orpo: no reference model
        self.ref_val = self.ref_train = None

    def prepare(self, model, ctx: Context) -> None:
        self.prepare_measure(model)
        if not self.reference_free and not hasattr(model, "disable_adapter"):
            with ctx.passes():  # as the policy's log-probs are computed in training
                self.ref_train = self.reference_pass(model, self.train)

    def prepare_measure(self, base) -> None:
        if not self.reference_free:
            self.ref_val = self.reference_pass(base, self.val)

    def reference_pass(self, model, pairs: list[Tokenized]) -> torch.Tensor:
        return reference_logprobs(model, pairs, self.pad_id)

    def weight(self, example: Tokenized) -> int:
        return 1

    def loss(self, model, batch, examples: list[int]) -> torch.Tensor:
        ref = None if self.reference_free else self.pass_reference(model, batch, examples)
        return dpo_sum_loss(model, batch, ref, self.cfg.dpo)

    def pass_reference(self, model, batch, examples: list[int]) -> torch.Tensor:
        """Reference log-probs (chosen, rejected) of this pass's pairs: precomputed, or the model with its adapter off."""
        if self.ref_train is not None:
            return self.ref_train[examples]
        with torch.no_grad(), model.disable_adapter():
            return torch.stack(pair_logprobs(model, batch), dim=1)

    def measure(self, model, examples: list[Tokenized]) -> dict:
        return preference_metrics(model, examples, self.ref_val, self.pad_id, self.cfg.dpo)

    def describe(self, m: dict) -> str:
        return (f"preference loss {m['eval_loss']:.4f}, reward accuracy {m['eval_reward_accuracy']:.3f}, margin "
                f"{m['eval_reward_margin']:.3f}, log-prob accuracy {m['eval_seq_logp_accuracy']:.3f} "
                f"(per token {m['eval_logp_accuracy']:.3f})")

    def results(self, before: dict, after: dict) -> list[str]:
        if not (before and after):
            return []
        return [f"held-out pairs: preference accuracy by log-prob {before['eval_seq_logp_accuracy']:.3f} -> "
                f"{after['eval_seq_logp_accuracy']:.3f}, per token {before['eval_logp_accuracy']:.3f} -> "
                f"{after['eval_logp_accuracy']:.3f}; reward accuracy {after['eval_reward_accuracy']:.3f}, "
                f"margin {after['eval_reward_margin']:.3f}"]


OBJECTIVE = Preference
