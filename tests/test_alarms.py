"""The RL alarms (evaluate/alarms.py) by hand: each rule fires on rows built to break it, stays quiet on a healthy run,
and clears when the run recovers."""
from tunesmith.evaluate.alarms import KL_BOUND_NATS, rl_alarms


def step(n, reward=0.5, flat=0.25, clipped=0.1, length=20.0, **extra):
    return {"step": n, "loss": 0.0, "reward": reward, "frac_reward_zero_std": flat, "clipped_ratio": clipped,
            "completion_length": length, "entropy": 1.0, **extra}


def held(n, total, **per_reward):
    return {"step": n, "eval_reward": total, **{f"eval_reward_{k}": v for k, v in per_reward.items()}, "eval_length": 20}


def kinds(rows, cap=64, **kw):
    return [a.kind for a in rl_alarms(rows, cap, **kw)]


def test_a_healthy_run_raises_nothing():
    rows = [held(0, 0.2, numeric=0.2)] + [step(n, reward=0.2 + 0.02 * n) for n in range(1, 11)] + [held(10, 0.4, numeric=0.4)]
    assert kinds(rows) == []
    assert kinds([]) == [] and kinds([held(0, 0.1)]) == []  # nothing sampled yet


def test_reward_up_while_a_heldout_reward_falls():
    rising = [step(n, reward=0.1 * n) for n in range(1, 9)]
    rows = [held(0, 0.5, rouge=0.40, length=0.6)] + rising + [held(8, 0.55, rouge=0.31, length=0.8)]
    [alarm] = rl_alarms(rows, 64)
    assert alarm.kind == "reward_up_heldout_down" and alarm.step == 8
    assert "eval_reward_rouge fell 0.400 -> 0.310" in alarm.message and alarm.value == 0.09
    # the held-out total holding up does not hide a per-reward fall; a fall within the noise bound is no alarm
    assert kinds([held(0, 0.5, rouge=0.40)] + rising + [held(8, 0.5, rouge=0.37)]) == []
    # a falling held-out reward with a flat rollout reward is not this alarm (nothing is being gamed)
    assert kinds([held(0, 0.5)] + [step(n, reward=0.3) for n in range(1, 9)] + [held(8, 0.2)]) == []
    # one held-out measurement cannot fall
    assert kinds(rising + [held(8, 0.1)]) == []


def test_answers_drifting_to_the_cap_and_answers_cut_from_the_start():
    drifting = [step(n, clipped=min(1.0, 0.1 * n), length=4 * n) for n in range(1, 11)]
    [alarm] = rl_alarms(drifting, 40)
    assert alarm.kind == "length_at_cap" and alarm.step == 10 and alarm.value == 0.9
    assert "rl.max_new_tokens=40" in alarm.message and "from 20% in the first steps" in alarm.message
    assert "reward hacking" in alarm.message
    capped = [step(n, clipped=0.9) for n in range(1, 6)]
    [alarm] = rl_alarms(capped, 40)
    assert "as from the start" in alarm.message and "warm up with SFT" in alarm.message
    assert kinds([step(n, clipped=0.9) for n in range(1, 3)]) == []      # fewer than 3 steps: not yet
    assert kinds(drifting + [step(n, clipped=0.2) for n in range(11, 14)]) == []  # recovered: cleared


def test_kl_past_its_bound_per_answer():
    # 0.2 nats per token over 40-token answers is 8 nats per answer: past 6
    rows = [step(n, kl=0.2, length=40.0) for n in range(1, 5)]
    [alarm] = rl_alarms(rows, 64)
    assert alarm.kind == "kl_past_bound" and alarm.value == 8.0 and alarm.bound == KL_BOUND_NATS
    assert kinds([step(n, kl=0.2, length=20.0) for n in range(1, 5)]) == []  # 4 nats per answer
    assert kinds(rows, kl_bound=10) == []
    assert kinds([step(n, length=40.0) for n in range(1, 5)]) == []  # no KL logged (rl.beta = 0)


def test_most_groups_flat_for_three_steps():
    rows = [step(1, flat=0.9), step(2, flat=0.8), step(3, flat=1.0)]
    [alarm] = rl_alarms(rows, 64)
    assert alarm.kind == "groups_flat" and alarm.value == 0.8 and "80%" in alarm.message
    assert kinds([step(1, flat=0.9), step(2, flat=0.5), step(3, flat=1.0)]) == []


def test_reused_rollouts_count_once():
    """rl.updates=2: each batch of rollouts is logged twice; the second copy (rollout_reused) is not a new step of
    evidence, so two batches are not three flat steps."""
    rows = [step(1, flat=1.0), step(2, flat=1.0, rollout_reused=1), step(3, flat=1.0), step(4, flat=1.0, rollout_reused=1)]
    assert kinds(rows) == []
    assert kinds(rows + [step(5, flat=1.0)]) == ["groups_flat"]


def test_alarms_serialise_for_the_studio():
    alarm = rl_alarms([step(n, flat=1.0) for n in range(1, 4)], 64)[0]
    assert set(alarm.as_dict()) == {"kind", "step", "message", "value", "bound"}
