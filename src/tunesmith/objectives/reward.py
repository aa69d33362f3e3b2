"""Reward models: one scalar score per answer, trained on prompt/chosen/rejected pairs so that the chosen answer
scores higher (Bradley-Terry, as in InstructGPT and TRL's RewardTrainer):

    loss = -log sigmoid(r_chosen - r_rejected - margin) + c (r_chosen + r_rejected)^2

with `reward.margin` (0 = plain Bradley-Terry) and `reward.center_coefficient` c (0 = off; TRL's
`center_rewards_coefficient`, which keeps scores near 0). The model is a sequence classifier with one label, so
plain transformers loads a finished run with AutoModelForSequenceClassification. `reward.pooling` says where an
answer's score is read: `last`, at its last token (transformers' rule: plain transformers gets the same scores), or
`mean`, the head's score at every token of the answer averaged (the answer tokens are those a pair's labels mark;
saved in final/tunesmith_reward.json, which `tunesmith eval` and RL's reward-model scorer read). Why `mean` exists: on
1.5k HH-RLHF pairs, frozen SmolLM2 states averaged over the answer separate chosen from rejected better than the last
token's at every layer probed, and a LoRA reward model trained that way scores higher on the test pairs
(docs/results.md).

Each pair is a pass of its own, as in DPO: the two answers share the prompt's computation (models/heads.py,
`sequence_scores`) and nothing is padded. Held-out: the pairwise accuracy (chosen scored higher; ties count half),
the mean margin r_chosen - r_rejected and the loss. The base's held-out numbers come from a freshly initialised head,
chance by construction.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pathlib import Path

from tunesmith.data.batching import collate
from tunesmith.data.render import IGNORE, Tokenized
from tunesmith.methods.load import save_reward_pooling
from tunesmith.models.generate import Generation
from tunesmith.models.heads import sequence_scores
from tunesmith.objectives import Objective


def bradley_terry_losses(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0,
                         center_coefficient: float = 0.0) -> torch.Tensor:
    """Per pair, from the two answers' scores (module docstring)."""
    loss = -F.logsigmoid(chosen - rejected - margin)
    if center_coefficient:
        loss = loss + center_coefficient * (chosen + rejected) ** 2
    return loss


def pair_scores(model, batch, pad_id: int, pooling: str = "last") -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) scores of a batch of pairs (its chosen rows, then its rejected rows), read as `pooling` says."""
    answers = batch.labels != IGNORE if pooling == "mean" else None
    scores = sequence_scores(model, batch.input_ids, pad_id, answers)[:, 0]
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


@torch.no_grad()
def score_pairs(model, pairs: list[Tokenized], pad_id: int, pooling: str = "last") -> torch.Tensor:
    """(n, 2) float64 scores of (chosen, rejected) for every pair, one pair per pass (as training runs them)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    out = torch.zeros(len(pairs), 2, dtype=torch.float64)
    for i, pair in enumerate(pairs):
        c, r = pair_scores(model, collate([pair], pad_id, device), pad_id, pooling)
        out[i, 0], out[i, 1] = float(c[0]), float(r[0])
    model.train(was)
    return out


def reward_scores(scores: torch.Tensor, cfg) -> dict:
    """Held-out metrics from (n, 2) scores of (chosen, rejected); `cfg` is the run's `reward` section."""
    if not len(scores):
        return {}
    margin = scores[:, 0] - scores[:, 1]
    loss = bradley_terry_losses(scores[:, 0], scores[:, 1], cfg.margin, cfg.center_coefficient)
    return {"eval_loss": round(float(loss.mean()), 5), "eval_accuracy": round(float(pairs_right(scores).mean()), 5),
            "eval_margin": round(float(margin.mean()), 5), "eval_score_chosen": round(float(scores[:, 0].mean()), 5),
            "eval_score_rejected": round(float(scores[:, 1].mean()), 5), "eval_pairs": len(scores)}


def pairs_right(scores: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 if the chosen answer scores higher, 0.5 on a tie, 0 if lower."""
    return (scores[:, 0] > scores[:, 1]).double() + 0.5 * (scores[:, 0] == scores[:, 1]).double()


class RewardModel(Objective):
    task = "reward"
    examples_per_pass = 1
    generates = False

    def weight(self, example: Tokenized) -> int:
        return 1  # the loss is averaged over pairs

    def loss(self, model, batch, examples: list[int]) -> torch.Tensor:
        chosen, rejected = pair_scores(model, batch, self.pad_id, self.cfg.reward.pooling)
        return bradley_terry_losses(chosen, rejected, self.cfg.reward.margin, self.cfg.reward.center_coefficient).sum()

    def measure(self, model, examples: list[Tokenized]) -> dict:
        return reward_scores(score_pairs(model, examples, self.pad_id, self.cfg.reward.pooling), self.cfg.reward)

    def samples(self, model, indices: list[int]) -> list[Generation]:
        """Each sample pair's two scores, for the side-by-side table (whose reference column is the chosen answer)."""
        scores = score_pairs(model, [self.data.val.tokens[i] for i in indices], self.pad_id, self.cfg.reward.pooling)
        return [Generation(text=f"chosen {c:+.3f}, rejected {r:+.3f} ({'right' if c > r else 'wrong'})", new_tokens=0,
                           stopped=True) for c, r in scores.tolist()]

    def describe(self, m: dict) -> str:
        return f"pairwise accuracy {m['eval_accuracy']:.3f}, margin {m['eval_margin']:+.3f}, loss {m['eval_loss']:.4f}"

    def results(self, before: dict, after: dict) -> list[str]:
        if not (before and after):
            return []
        return [f"held-out pairs ({after['eval_pairs']}): pairwise accuracy {before['eval_accuracy']:.3f} -> "
                f"{after['eval_accuracy']:.3f}, mean margin {before['eval_margin']:+.3f} -> {after['eval_margin']:+.3f} "
                f"(before: the base with a new, untrained head)"]

    def save(self, folder: Path) -> None:
        save_reward_pooling(folder, self.cfg.reward.pooling)


OBJECTIVE = RewardModel
