"""Online RL in the studio: what the new-run form offers for it, the headroom check before a launch, and what a running
RL job's page draws and warns about.

  GET  /v1/studio/rl/options        reward kinds (with their fields), algorithms, the rl.* defaults; `function` rewards
                                    only when the studio was started with --allow-code (also under /v1/studio/options'
                                    `rl` key)
  POST /v1/studio/headroom          pass@1 of the greedy answer against pass@K of K samples (objectives/headroom.py, the
                                    measurement an RL run makes before its first step and `tunesmith eval RUN --samples
                                    K` makes of a run) on a few held-out prompts of the form's settings, before anything
                                    is launched: at most 16 prompts x 16 samples x 256 tokens, one at a time, off the
                                    event loop. The settings are resolved and checked exactly as a job's would be
                                    (submit.settings_config: a function reward is refused without --allow-code)
  GET  /v1/studio/runs/{name}/rl    the run's RL numbers from metrics.jsonl (reward per reward function, held-out
                                    rewards, KL, answer length, clipped shares, entropy, flat groups, headroom), what the
                                    task declares to chart (catalog.task_shows_json) and the alarms its rows raise now
                                    (evaluate/alarms.py: the same rule the CLI can run over the file)
"""
from __future__ import annotations

import asyncio
import json
import typing
from pathlib import Path

from fastapi import APIRouter, Request
from pydantic import Field

from tunesmith.catalog import task_shows_json
from tunesmith.config import RewardFunction, RLConfig, load_config
from tunesmith.errors import TunesmithError
from tunesmith.evaluate.alarms import KL_BOUND_NATS, rl_alarms
from tunesmith.run import RunDir
from tunesmith.run.files import read_jsonl
from tunesmith.studio.jobs import JobError, reward_run
from tunesmith.studio.protocol import Settings
from tunesmith.studio.submit import settings_config

from .common import public_error, run_or_404

router = APIRouter()

# the metrics.jsonl keys the RL page reads (objectives/rl.py logs them); `rewards/<name>/mean|std`, `eval_reward_*`
# and `headroom_*` keys are passed on too
RL_KEYS = ("step", "total_steps", "reward", "reward_std", "frac_reward_zero_std", "completion_length",
           "completion_length_max", "clipped_ratio", "entropy", "kl", "clip_ratio", "skipped_groups", "overlong_penalty",
           "rollout_reused", "eval_reward", "eval_length", "lr", "tok_s", "elapsed")
RL_PREFIXES = ("rewards/", "eval_reward_", "headroom_")
# what each reward kind is configured by on the form (config.RewardFunction's fields)
REWARD_FIELDS = {"exact": ("column",), "numeric": ("column",), "regex": ("pattern",), "length": ("min_words", "max_words"),
                 "rouge": ("column",), "bleu": ("column",), "chrf": ("column",), "countdown": ("column",),
                 "model": ("path",), "function": ("path",)}
MAX_PROMPTS, MAX_SAMPLES, MAX_TOKENS = 16, 16, 256
_measuring = asyncio.Lock()  # one headroom measurement at a time (each loads a model and samples)


def reward_runs(home: Path) -> list[str]:
    """The studio's finished reward-model runs, as an RL reward names them (`runs/NAME`: jobs run in the home)."""
    found = []
    runs = Path(home) / "runs"
    for p in sorted(runs.iterdir()) if runs.is_dir() else []:
        try:
            task = json.loads(RunDir(p).summary.read_text()).get("task")
        except (OSError, ValueError):
            continue
        if task == "reward" and (p / "final").is_dir():
            found.append(f"runs/{p.name}")
    return found


def rl_options(allow_code: bool, home: Path) -> dict:
    """What the form offers for task=rl: reward kinds with their fields (no `function` without --allow-code), and the
    studio's finished reward-model runs a `model` reward may name."""
    kinds = typing.get_args(RewardFunction.model_fields["kind"].annotation)
    defaults = RLConfig()
    return {"reward_kinds": [{"kind": k, "fields": list(REWARD_FIELDS.get(k, ()))} for k in kinds
                             if k != "function" or allow_code],
            "algorithms": list(typing.get_args(RLConfig.model_fields["algorithm"].annotation)),
            "defaults": {"algorithm": defaults.algorithm, "group_size": defaults.group_size, "beta": defaults.beta,
                         "max_new_tokens": defaults.max_new_tokens, "temperature": defaults.temperature},
            "allow_code": allow_code, "kl_bound": KL_BOUND_NATS, "reward_runs": reward_runs(home)}


@router.get("/v1/studio/rl/options")
async def options(request: Request):
    state = request.app.state
    return await asyncio.to_thread(rl_options, state.policy.allow_code, state.home)


class HeadroomRequest(Settings):
    """The form's settings (task=rl with its rewards, as overrides) and how much to measure."""
    prompts: int = Field(8, ge=1, le=MAX_PROMPTS)
    samples: int = Field(8, ge=2, le=MAX_SAMPLES)


def measure_headroom_of(cfg, prompts: int, samples: int, policy=None) -> dict:
    """pass@1 / pass@K of the config's start model on `prompts` of its held-out prompts, scored by its rewards: what
    an RL run of `cfg` logs before its first step (objectives/rl.py), on fewer prompts. A reward-model run named as
    `runs/NAME` is the one in the studio's home (jobs.reward_run: where a job would find it)."""
    import torch

    from tunesmith.assemble import assemble
    from tunesmith.data.render import render
    from tunesmith.evaluate.evaluation import _load, eval_examples
    from tunesmith.models import pick_device
    from tunesmith.objectives.headroom import describe, measure_headroom
    from tunesmith.objectives.rewards import build_rewards
    from tunesmith.objectives.rl import rollouts_for

    if cfg.task != "rl" or not cfg.rl.rewards:
        raise TunesmithError("the headroom check needs task=rl and at least one reward (rl.rewards)")
    if policy is not None:
        specs = [s.model_copy(update={"path": str(run)}) if s.kind == "model" and (run := reward_run(s.path, policy))
                 else s for s in cfg.rl.rewards]
        cfg = cfg.model_copy(update={"rl": cfg.rl.model_copy(update={"rewards": specs})})
    device = torch.device(pick_device())
    run = assemble(cfg, device, with_model=False)
    examples = eval_examples(run, cfg, None, prompts)
    specs = list(cfg.rl.rewards)
    tokenizer = run.tokenizer
    rendered = [render(ex, cfg.data.template, tokenizer, False, cfg.data.system_prompt) for ex in examples]
    ids = tokenizer([r.prompt for r in rendered], add_special_tokens=cfg.data.template != "chat")["input_ids"]
    cap = min(cfg.rl.max_new_tokens, MAX_TOKENS)
    model = _load(run.model_dir, run.precision.dtype, device)
    h = measure_headroom(model, tokenizer, ids, lambda texts, out, per: rollouts_for(examples, rendered, texts, out, per),
                         build_rewards(specs, device), {s.label: s.kind for s in specs}, samples, cfg.rl.temperature,
                         cfg.rl.top_p, cap, seed=cfg.train.seed)
    return {"headroom": h, "text": describe(h), "warnings": h["warnings"], "prompts": len(examples), "samples": samples,
            "max_new_tokens": cap, "temperature": cfg.rl.temperature}


@router.post("/v1/studio/headroom")
async def headroom(request: Request, body: HeadroomRequest):
    state = request.app.state
    if _measuring.locked():
        return public_error(request, 429, "a headroom check is running; one at a time (retry when it has finished)",
                            code="rate_limit_exceeded", headers={"Retry-After": "10"})

    def work():
        cfg = settings_config(state.store, state.home, body.job_request(), state.policy)  # checked as a job's would be
        return measure_headroom_of(cfg, body.prompts, body.samples, state.policy)
    async with _measuring:
        try:
            return await asyncio.to_thread(work)
        except (JobError, TunesmithError) as e:  # JobError's code: override_not_allowed for what the policy refuses
            return public_error(request, 400, str(e), getattr(e, "param", None), getattr(e, "code", None))


def rl_rows(rows: list) -> list[dict]:
    """The metrics rows' RL numbers (no other keys: the page polls them)."""
    out = []
    for r in rows:
        if not isinstance(r, dict):
            continue
        kept = {k: v for k, v in r.items() if k in RL_KEYS or k.startswith(RL_PREFIXES)}
        if len(kept) > 1 or r.get("step") == 0:
            out.append(kept)
    return out


@router.get("/v1/studio/runs/{name}/rl")
async def run_rl(request: Request, name: str):
    def work():
        run, err = run_or_404(request, name)
        if err:
            return err
        try:
            cfg = load_config(str(run.config)) if run.config.exists() else None
        except TunesmithError:
            cfg = None
        if cfg is None or cfg.task != "rl":
            return {"task": cfg.task if cfg else None, "finished": run.is_finished(), "rows": [], "alarms": []}
        rows = read_jsonl(run.metrics) if run.metrics.exists() else []
        return {"task": "rl", "finished": run.is_finished(), "shows": task_shows_json("rl"),
                "settings": {"algorithm": cfg.rl.algorithm, "group_size": cfg.rl.group_size, "beta": cfg.rl.beta,
                             "max_new_tokens": cfg.rl.max_new_tokens,
                             "rewards": [{"name": s.label, "kind": s.kind, "weight": s.weight} for s in cfg.rl.rewards]},
                "kl_bound": KL_BOUND_NATS, "rows": rl_rows(rows),
                "alarms": [a.as_dict() for a in rl_alarms(rows, cfg.rl.max_new_tokens)]}
    return await asyncio.to_thread(work)
