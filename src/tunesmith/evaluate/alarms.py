"""Alarms over an online-RL run's metrics: the four ways an RL run most often goes wrong, read off its metrics.jsonl
rows (what objectives/rl.py logs each step and each held-out measurement), as a pure function, so the studio's run page,
the CLI and the training log can all say the same thing.

    reward_up_heldout_down  the rollouts' reward rises while a held-out reward falls (the policy games its training
                            prompts or the reward: the held-out `eval_reward` / `eval_reward_<name>` of the greedy
                            answers, with a weight-0 reward as an independent yardstick)
    length_at_cap           most answers are cut at rl.max_new_tokens, and more of them than at the start (`clipped_ratio`:
                            rising lengths are the common sign of reward hacking; answers cut from the first step on are
                            said too: a cut answer rarely earns its reward)
    kl_past_bound           the KL to the reference, per answer (`kl` per token x `completion_length`), is past its bound:
                            6 nats by default, the target of TRL's / Ziegler et al.'s adaptive KL controller (logged only
                            with rl.beta > 0)
    groups_flat             in each of the last 3 steps at least 80 % of the groups had all-equal rewards: they teach
                            nothing (the thresholds objectives/rl.py warns at, axolotl's 0.8)

Each alarm holds while its condition holds in the latest rows (a run that recovers stops raising it); trends are read
over windows of 3 rollout steps, so one noisy step neither raises nor clears one. Steps that re-train on the same
rollouts (rl.updates > 1: `rollout_reused`) are counted once. A plain function over rows and not a hook in training:
it runs on a finished run's file as well as on a live one, in any process that can read the file.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Optional

from tunesmith.objectives.rl import CAPPED_SHARE, FLAT_SHARE, FLAT_STEPS, RISE

WINDOW = 3               # rollout steps a trend is averaged over (start and end)
KL_BOUND_NATS = 6.0      # KL per answer (nats): TRL's PPO adaptive-KL target (Ziegler et al. 2019)
REWARD_RISE = 0.05       # a rise of the rollouts' reward, x max(1, |start|): rewards in [0, 1] move by 0.05
HELDOUT_FALL = 0.05      # a fall of a held-out reward, x max(1, |start|)


@dataclass(frozen=True)
class Alarm:
    kind: str            # reward_up_heldout_down | length_at_cap | kl_past_bound | groups_flat
    step: int            # the latest step that shows it
    message: str         # what is wrong and what to try, one paragraph
    value: float         # the measured number the rule compares (share, nats, held-out fall)
    bound: float         # what it was compared with

    def as_dict(self) -> dict:
        return asdict(self)


def rollout_rows(rows: Iterable[dict]) -> list[dict]:
    """The rows of steps that sampled new rollouts (one per batch of rollouts), in step order."""
    return [r for r in rows if r.get("reward") is not None and not r.get("rollout_reused")]


def heldout_rows(rows: Iterable[dict]) -> list[dict]:
    """The held-out measurements (`eval_reward`), in step order; the last one per step wins."""
    by_step = {}
    for r in rows:
        if r.get("eval_reward") is not None:
            by_step[r.get("step", 0)] = r
    return [by_step[s] for s in sorted(by_step)]


def _mean(values: list) -> Optional[float]:
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None


def rl_alarms(rows: Iterable[dict], max_new_tokens: int, kl_bound: float = KL_BOUND_NATS) -> list[Alarm]:
    """The alarms the latest metrics rows of an RL run raise (module docstring), oldest rule first. `rows`: the run's
    metrics.jsonl as dicts; `max_new_tokens`: its rl.max_new_tokens (named in the messages)."""
    rows = list(rows)
    rollouts = rollout_rows(rows)
    alarms: list[Alarm] = []
    if not rollouts:
        return alarms
    last_step = int(rollouts[-1].get("step", 0))
    first, last = rollouts[:WINDOW], rollouts[-WINDOW:]

    # the rollouts' reward up while a held-out reward falls
    held = heldout_rows(rows)
    r0, r1 = _mean([r["reward"] for r in first]), _mean([r["reward"] for r in last])
    if len(held) >= 2 and len(rollouts) > WINDOW and r1 - r0 > REWARD_RISE * max(1.0, abs(r0)):
        start, now = held[0], held[-1]
        keys = ["eval_reward"] + sorted(k for k in now if k.startswith("eval_reward_"))
        falls = [(start[k] - now[k], k) for k in keys if start.get(k) is not None and now.get(k) is not None
                 and start[k] - now[k] > HELDOUT_FALL * max(1.0, abs(start[k]))]
        if falls:
            drop, key = max(falls)
            alarms.append(Alarm(
                "reward_up_heldout_down", max(last_step, int(now.get("step", 0))),
                f"reward up while held-out quality falls: the rollouts' reward rose {r0:.3f} -> {r1:.3f} while the held-out "
                f"{key} fell {start[key]:.3f} -> {now[key]:.3f} (step {start.get('step', 0)} -> {now.get('step', 0)}): "
                f"the policy may be gaming its training prompts or the reward. Read some answers; add rl.beta, a weight-0 "
                f"reward as a yardstick, or stop at an earlier checkpoint", round(drop, 5), HELDOUT_FALL))

    # answers drifting to the cap
    c0, c1 = _mean([r.get("clipped_ratio") for r in first]), _mean([r.get("clipped_ratio") for r in last])
    if c1 is not None and len(last) == WINDOW and c1 > CAPPED_SHARE:
        rising = c0 is not None and len(rollouts) > WINDOW and c1 > c0 + RISE
        start_said = f"from {c0:.0%} in the first steps" if rising else "as from the start"
        length = _mean([r.get("completion_length") for r in last])
        alarms.append(Alarm(
            "length_at_cap", last_step,
            f"answers at the length cap: {c1:.0%} of the last {WINDOW} steps' answers were cut at rl.max_new_tokens="
            f"{max_new_tokens} ({start_said}; mean length {length or 0:.0f} tokens). "
            + ("Lengths rising to the cap are the common sign of reward hacking: read the answers, bound a length reward "
               "(max_words), add rl.overlong_penalty or rl.beta" if rising else
               "A cut answer rarely earns its reward: raise rl.max_new_tokens if the task needs it, or warm up with SFT "
               "so answers end"), round(c1, 4), CAPPED_SHARE))

    # KL past its bound (logged with rl.beta > 0)
    with_kl = [r for r in rows if r.get("kl") is not None and r.get("completion_length") is not None]
    if with_kl:
        recent = with_kl[-WINDOW:]
        per_token = _mean([r["kl"] for r in recent])
        per_answer = _mean([r["kl"] * r["completion_length"] for r in recent])
        if per_answer > kl_bound:
            alarms.append(Alarm(
                "kl_past_bound", int(recent[-1].get("step", last_step)),
                f"KL past its bound: {per_answer:.1f} nats per answer ({per_token:.3f} per token) from the reference over "
                f"the last {len(recent)} steps, past {kl_bound:g}: the policy has moved far from where it started. Raise "
                f"rl.beta or lower train.lr", round(per_answer, 4), kl_bound))

    # most groups flat
    recent = rollouts[-FLAT_STEPS:]
    if len(recent) == FLAT_STEPS and all((r.get("frac_reward_zero_std") or 0) >= FLAT_SHARE for r in recent):
        share = min(r["frac_reward_zero_std"] for r in recent)
        alarms.append(Alarm(
            "groups_flat", last_step,
            f"most groups flat: in each of the last {FLAT_STEPS} steps at least {share:.0%} of the groups had all-equal "
            f"rewards, which teach nothing. The task may be too hard or too easy for the model (see the headroom check), "
            f"or a reward may not vary: raise rl.group_size or rl.temperature, or warm up with SFT", round(share, 4),
            FLAT_SHARE))
    return alarms
