"""Online reinforcement learning from rewards (`task: rl`): GRPO and RLOO, as TRL's GRPOTrainer / RLOOTrainer compute
them, on the loop every objective shares.

Each step, for every prompt of the step (`begin_step`):
  1. sample `rl.group_size` completions on the generation engine (models/engine.py): the prompt is prefilled once and
     its KV cache copied to the group's rows, rows decode together in one batch with a KV cache and leave it when they
     end, a LoRA model runs its kept merged weights; the sampling is seeded per (step, prompt, completion);
  2. score them with the rewards (rewards.py), weighted and summed; an answer that never ends (cut at
     rl.max_new_tokens without an end-of-sequence token) loses rl.overlong_penalty (TRL's missing_eos_penalty), or with
     rl.overlong_buffer a share of it rising linearly over the last `buffer` tokens before the cap (DAPO's soft overlong
     punishment), before the advantages;
  3. advantages within the group: `grpo` A = r - mean(group) (/ std(group) with rl.scale_rewards=group, / std(step)
     with batch); `rloo` A = r - mean(the group's other completions);
  4. with rl.updates > 1, the completions' log-probs now (old_logps) and, with rl.beta > 0, the reference's
     (the base with the adapter switched off for adapter methods; a frozen copy of the starting weights for full
     fine-tuning).
Then each pass (`loss`, one prompt's group: its completions share the prompt's computation, models/heads.py) takes
the clipped surrogate per completion token (a group whose rewards are all equal has advantages 0: with rl.beta = 0
its gradient is exactly 0, so its pass is skipped; `skipped_groups` is the share, `entropy` covers the groups run)

    ratio = exp(logp - old_logp)      (old_logp = logp, detached, on a batch's first update: ratio 1, gradient A)
    l = -min(ratio A, clip(ratio, 1 - eps, 1 + eps_high) A) + beta (exp(ref - logp) - (ref - logp) - 1)

(rl.importance=sequence, GSPO: ratio = exp(mean over the completion's tokens of (logp - old_logp)), one per
completion, the same at each of its tokens)

averaged as rl.loss says: `grpo` per completion then over the group; `dr_grpo` summed over the group / (G x
rl.max_new_tokens); `dapo` over all completion tokens of the global step. Under torchrun each process samples its
share of the prompts, and the step's statistics (dapo's token count, rl.scale_rewards=batch's std, the logged reward,
length, flat-group, entropy, clipping and KL numbers) are taken over every process's rollouts and tokens, as TRL
gathers them, so two processes train and log as one.

With rl.updates = mu the same rollouts train mu consecutive optimizer steps (the loop repeats the step's batch,
`steps_per_batch`). What every step logs (metrics.jsonl, report, studio): reward mean and std (overall and per reward),
the share of groups whose rewards are all equal (they teach nothing), completion length mean/max and the share cut at
rl.max_new_tokens, the policy's entropy, KL to the reference (rl.beta > 0), the share of clipped tokens, and the
step's seconds split into rollouts / rewards / old and reference log-probs / update (bench/rl_step.py summarises them).
The log warns when most groups stop varying or lengths rise to the cap.

Before the first step (`prepare`, not on resume), the headroom check (headroom.py): pass@1 of the greedy answer
against pass@K of rl.headroom_samples samples on rl.headroom_examples held-out prompts, logged with a warning when RL has
little to gain or the format never comes out, and added as `headroom_*` keys to the base's held-out measurement.

Held out: the greedy completion of every held-out prompt, scored by the same rewards: `eval_reward` (the weighted
total) and `eval_reward_<name>` per reward, with the mean length.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from tunesmith.collectives import across_processes, gather, joined
from tunesmith.data.render import Tokenized
from tunesmith.models.engine import Engine, Request, Sampling
from tunesmith.models.heads import hidden_and_head
from tunesmith.objectives import Context, Objective
from tunesmith.objectives.headroom import describe as describe_headroom
from tunesmith.objectives.headroom import flat_metrics, measure_headroom
from tunesmith.objectives.rewards import Reward, Rollouts, build_rewards, check_columns, score_all
from tunesmith.run import RunDir

# warn when this share of a step's groups have all-equal rewards, for this many steps in a row (axolotl's threshold 0.8)
FLAT_SHARE, FLAT_STEPS = 0.8, 3
CAPPED_SHARE, RISE = 0.5, 0.25  # warn when over half the completions run to the cap, a quarter more than at the start
WARN_EVERY = 25     # a condition that lasts is warned about again every this many steps


@dataclass
class Group:
    """One prompt's completions and what the update needs of them."""
    example: int
    prompt_ids: list[int]
    completions: list[list[int]]
    truncated: torch.Tensor          # (G,) bool: cut at rl.max_new_tokens
    rewards: torch.Tensor            # (G,) float64
    advantages: torch.Tensor         # (G,) float32
    old_logps: torch.Tensor | None = None  # (G, L) at sampling time (rl.updates > 1)
    ref_logps: torch.Tensor | None = None  # (G, L) of the reference (rl.beta > 0)

    def tensors(self, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (G, P + L) right-padded, completion mask (G, L))."""
        width = max(len(c) for c in self.completions)
        prompt = torch.tensor(self.prompt_ids, dtype=torch.long)
        ids = torch.full((len(self.completions), len(prompt) + width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(self.completions), width, dtype=torch.bool)
        for g, c in enumerate(self.completions):
            ids[g, :len(prompt)] = prompt
            ids[g, len(prompt):len(prompt) + len(c)] = torch.tensor(c, dtype=torch.long)
            mask[g, :len(c)] = True
        return ids.to(device), mask.to(device)


def completion_logps(model, ids: torch.Tensor, prompt_len: int, width: int, temperature: float,
                     with_entropy: bool = False):
    """(G, width) log-probs of each completion token under `model` at `temperature` (as sampled), and the (G, width)
    entropy of the next-token distribution when asked. The vocabulary head runs on completion positions only."""
    parts = hidden_and_head(model, ids)
    if parts is None:
        logits = model(input_ids=ids, use_cache=False).logits[:, -ids.shape[1]:][:, prompt_len - 1:prompt_len - 1 + width]
    else:
        hidden, weight = parts
        logits = hidden[:, prompt_len - 1:prompt_len - 1 + width] @ weight.T
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    targets = ids[:, prompt_len:prompt_len + width]
    logps = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return logps
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logps, entropy


def group_advantages(rewards: torch.Tensor, algorithm: str, scale: str, step_std: float | None = None) -> torch.Tensor:
    """(G,) advantages of one group's rewards (module docstring, step 3)."""
    g = rewards.shape[0]
    if algorithm == "rloo":
        return (rewards - (rewards.sum() - rewards) / (g - 1)).float()
    centred = rewards - rewards.mean()
    if scale == "group":
        centred = centred / (rewards.std() + 1e-4)
    elif scale == "batch":
        centred = centred / ((step_std or 0.0) + 1e-4)
    return centred.float()


def overlong_penalties(lengths: torch.Tensor, truncated: torch.Tensor, cfg) -> torch.Tensor:
    """(n,) float64 amounts taken off each completion's total reward for not ending (module docstring): without
    rl.overlong_buffer, rl.overlong_penalty for a completion cut at the cap; with it, DAPO's soft ramp, 0 up to
    (max_new_tokens - buffer) tokens, rising linearly to the full penalty at max_new_tokens."""
    if not cfg.overlong_penalty:
        return torch.zeros(len(lengths), dtype=torch.float64)
    if not cfg.overlong_buffer:
        return cfg.overlong_penalty * truncated.to(torch.float64)
    start = cfg.max_new_tokens - cfg.overlong_buffer
    ramp = ((lengths.to(torch.float64) - start) / cfg.overlong_buffer).clamp(0.0, 1.0)
    return cfg.overlong_penalty * torch.where(truncated, torch.ones_like(ramp), ramp)


def surrogate(logps, old_logps, ref_logps, advantages, mask, cfg) -> tuple[torch.Tensor, dict]:
    """Per-token loss (G, L) of the clipped surrogate (+ KL) and, detached, what was clipped and the KL.
    rl.importance=sequence (GSPO): every token of a completion carries its sequence's ratio, exp of the mean log-ratio
    over the completion's tokens (`mask`), clipped as one."""
    old = logps.detach() if old_logps is None else old_logps
    log_ratio = logps - old
    if cfg.importance == "sequence":
        m = mask.to(log_ratio.dtype)
        per_sequence = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)
        log_ratio = per_sequence.expand_as(logps)
    ratio = torch.exp(log_ratio)
    a = advantages[:, None]
    high = cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon
    unclipped, clipped = ratio * a, torch.clamp(ratio, 1 - cfg.epsilon, 1 + high) * a
    per_token = -torch.min(unclipped, clipped)
    stats = {}
    with torch.no_grad():
        stats["clipped"] = float(((clipped < unclipped) & mask).sum())
    if cfg.beta and ref_logps is not None:
        diff = ref_logps - logps
        kl = torch.exp(diff) - diff - 1
        per_token = per_token + cfg.beta * kl
        stats["kl"] = float((kl.detach() * mask).sum())
    return per_token, stats


class OnlineRL(Objective):
    task = "rl"
    examples_per_pass = 1   # a pass per prompt: its G completions share the prompt's computation
    generates = True
    checks_forgetting = True  # a policy optimised on its own samples drifts too: general text against the base

    def __init__(self, cfg, data, tokenizer):
        super().__init__(cfg, data, tokenizer)
        self.rl = cfg.rl
        self.steps_per_batch = cfg.rl.updates
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.rewards: list[Reward] = []
        self.reference = None
        self.groups: dict[int, Group] = {}
        self.batch_id: int | None = None
        self.token_scale = 1.0
        self.metrics: dict = {}
        self.rollout_metrics: dict = {}
        self.flat_steps = 0
        self.capped_start: float | None = None
        self.capped_warned = -WARN_EVERY
        self.updating_since = time.perf_counter()
        self.log = print
        self.headroom: dict | None = None
        self._val_index = {id(t): i for i, t in enumerate(data.val.tokens)}

    # -- before training
    def load(self, ctx: Context, examples_needed: int) -> None:
        self.log, self.device = ctx.log, ctx.device
        split = self.data.train  # before the run folder exists and anything is sampled: the answer columns are there
        check_columns(self.rl.rewards, {c for ex in split.examples[:200] for c in ex.columns},
                      any(r.reference for r in split.rendered))
        self.rewards = build_rewards(self.rl.rewards, ctx.device)
        ctx.log("rl: " + ", ".join(f"{r.name} x {r.weight:g}" for r in self.rewards) + f" | {self.rl.algorithm}, loss "
                f"{self.rl.loss}, {self.rl.group_size} completions per prompt up to {self.rl.max_new_tokens} tokens, "
                f"beta {self.rl.beta:g}, {self.rl.updates} update(s) per batch of rollouts")

    def prepare(self, model, ctx: Context) -> None:
        super().prepare(model, ctx)
        if self.rl.beta and not hasattr(model, "disable_adapter"):  # full fine-tuning: the starting weights, frozen
            self.reference = copy.deepcopy(model).eval()
            for p in self.reference.parameters():
                p.requires_grad_(False)
        # a resumed run measured its headroom when it started (baseline.json, in the run folder beside cache_dir)
        resuming = ctx.cache_dir is not None and RunDir(ctx.cache_dir.parent).baseline.exists()
        if self.rl.headroom_samples and self.rl.headroom_examples and ctx.main and not resuming and self.data.val.tokens:
            self.headroom = self.measure_headroom(model, ctx.log)

    def measure_headroom(self, model, log=print) -> dict:
        """pass@1 against pass@K (headroom.py) on the first rl.headroom_examples held-out prompts -- the ones the
        held-out measurement scores (the first eval.max_examples), so the greedy pass@1 is its reward on the same
        prompts; logged, with its warnings, and kept for the first held-out measurement (eval.json's `before`)."""
        t0 = time.perf_counter()
        K = self.rl.headroom_samples
        idx = list(range(min(len(self.data.val.tokens), self.rl.headroom_examples)))
        h = measure_headroom(model, self.tokenizer, [self.data.val.tokens[i].input_ids.tolist() for i in idx],
                             lambda texts, ids, per: self._rollouts(self.data.val, idx, texts, ids, per), self.rewards,
                             {spec.label: spec.kind for spec in self.rl.rewards}, K, self.rl.temperature, self.rl.top_p,
                             self.rl.max_new_tokens, seed=self.cfg.train.seed)
        log(f"headroom before training ({time.perf_counter() - t0:.0f} s, temperature {self.rl.temperature:g}): "
            + describe_headroom(h))
        for warning in h["warnings"]:
            log(f"warning: headroom: {warning}")
        return h

    def weight(self, example: Tokenized) -> int:
        return 1  # a step's loss is averaged over its prompts

    # -- each step
    def begin_step(self, model, examples: list[int], step: int) -> None:
        batch = step // self.steps_per_batch
        if batch == self.batch_id and all(i in self.groups for i in examples):  # another update on the same rollouts
            self.metrics = {**self.rollout_metrics, "rollout_seconds": 0.0, "reward_seconds": 0.0, "logp_seconds": 0.0,
                            "rollout_reused": 1}
            self.updating_since = time.perf_counter()
            return
        t0 = time.perf_counter()
        unique = list(dict.fromkeys(examples))
        completions, texts, truncated = self._sample(model, unique, batch)
        t1 = time.perf_counter()
        G = self.rl.group_size
        rollouts = self._rollouts(self.data.train, unique, texts, completions)
        total, table = score_all(self.rewards, rollouts)
        t2 = time.perf_counter()
        lengths = torch.tensor([len(c) for c in completions], dtype=torch.float64)
        total = total - overlong_penalties(lengths, truncated, self.rl)  # answers that never end
        # the step's statistics are over every process's rollouts (torchrun), so two processes train and log as one
        every_total, every_table, every_length, every_truncated = across_processes(total, table, lengths, truncated)
        step_std = float(every_total.std()) if len(every_total) > 1 else 0.0
        self.groups = {}
        for k, i in enumerate(unique):
            rows = slice(k * G, (k + 1) * G)
            self.groups[i] = Group(i, self.train[i].input_ids.tolist(), completions[rows], truncated[rows], total[rows],
                                   group_advantages(total[rows], self.rl.algorithm, self.rl.scale_rewards, step_std))
        self._log_probs_before(model)
        self.batch_id = batch
        kept = torch.ones_like(every_truncated) if not self.rl.mask_truncated else ~every_truncated
        # dapo: the loop divides a step's loss by its prompts over every process; this makes it the mean over every
        # process's completion tokens
        self.token_scale = (len(every_total) / G) / max(1.0, float((every_length * kept).sum()))
        groups = every_total.view(-1, G)
        flat = float((groups == groups[:, :1]).all(dim=1).double().mean())
        total, table, lengths, truncated = every_total, every_table, every_length, every_truncated
        m = {"reward": round(float(total.mean()), 5), "reward_std": round(float(total.std()), 5),
             "frac_reward_zero_std": round(flat, 4), "completion_length": round(float(lengths.mean()), 2),
             "completion_length_max": int(lengths.max()), "clipped_ratio": round(float(truncated.double().mean()), 4),
             "rollout_seconds": round(t1 - t0, 2), "reward_seconds": round(t2 - t1, 2),
             "logp_seconds": round(time.perf_counter() - t2, 2), "completion_tokens": int(lengths.sum())}
        if self.rl.overlong_penalty:
            m["overlong_penalty"] = round(float(overlong_penalties(lengths, truncated, self.rl).mean()), 5)
        for reward, row in zip(self.rewards, table):
            known = row[~torch.isnan(row)]
            m[f"rewards/{reward.name}/mean"] = round(float(known.mean()), 5) if len(known) else None
            m[f"rewards/{reward.name}/std"] = round(float(known.std()), 5) if len(known) > 1 else None
        self.metrics, self.rollout_metrics = m, dict(m)
        self._warn(flat, float(truncated.double().mean()), step)
        self.updating_since = time.perf_counter()

    def _sample(self, model, examples: list[int], batch: int):
        """G completions per prompt on the engine: (ids per completion, text per completion, truncated (n,) bool)."""
        G, rl = self.rl.group_size, self.rl
        was = model.training
        engine = Engine(model, self.tokenizer, max_rows=min(64, G * len(examples)))
        requests = []
        for i in examples:
            prompt = self.train[i].input_ids.tolist()
            for g in range(G):
                seed = (((self.cfg.train.seed * 1_000_003 + batch) * 1_000_033 + i) * 1_009 + g) % (2**63 - 1)
                sampling = Sampling(max_new_tokens=rl.max_new_tokens, do_sample=True, temperature=rl.temperature,
                                    top_k=0, top_p=rl.top_p, seed=seed)
                requests.append(Request(prompt, sampling))
        try:
            engine.run(requests)
        finally:
            model.train(was)
        failed = next((r for r in requests if r.finish_reason == "error"), None)
        if failed is not None:
            raise RuntimeError(f"rollout generation failed: {failed.error}")
        return ([list(r.output_ids) for r in requests], [r.text for r in requests],
                torch.tensor([r.finish_reason == "length" for r in requests]))

    def _rollouts(self, split, examples: list[int], texts: list[str], completions: list[list[int]], per: int | None = None) -> Rollouts:
        return rollouts_for([split.examples[i] for i in examples], [split.rendered[i] for i in examples], texts,
                            completions, per or self.rl.group_size)

    @torch.no_grad()
    def _log_probs_before(self, model) -> None:
        """Old log-probs (rl.updates > 1) and the reference's (rl.beta > 0), per group, before any update."""
        if self.steps_per_batch == 1 and not self.rl.beta:
            return
        for group in self.groups.values():
            ids, mask = group.tensors(self.pad_id, self.device)
            p, width = len(group.prompt_ids), mask.shape[1]
            if self.steps_per_batch > 1:
                group.old_logps = completion_logps(model, ids, p, width, self.rl.temperature)
            if self.rl.beta:
                if self.reference is not None:
                    group.ref_logps = completion_logps(self.reference, ids, p, width, self.rl.temperature)
                else:
                    with model.disable_adapter():
                        group.ref_logps = completion_logps(model, ids, p, width, self.rl.temperature)

    def _warn(self, flat: float, capped: float, step: int) -> None:
        self.flat_steps = self.flat_steps + 1 if flat >= FLAT_SHARE else 0
        if self.flat_steps % WARN_EVERY == FLAT_STEPS % WARN_EVERY:
            self.log(f"warning: step {step + 1}: in {FLAT_STEPS} steps in a row at least {FLAT_SHARE:.0%} of the groups had "
                     f"all-equal rewards, which teach nothing (loss and gradient ~0). The task may be too hard or too easy "
                     f"for the model, or a reward may not vary: raise rl.group_size or rl.temperature, or check the "
                     f"rewards on a few completions")
        if self.capped_start is None:  # the first rollouts: what the model does before training
            self.capped_start = capped
            if capped > CAPPED_SHARE:
                self.log(f"note: {capped:.0%} of the first completions already run to rl.max_new_tokens="
                         f"{self.rl.max_new_tokens}: a cut answer rarely earns its reward; raise the cap if the task needs it")
        elif capped > max(CAPPED_SHARE, self.capped_start + RISE) and step - self.capped_warned >= WARN_EVERY:
            self.capped_warned = step
            self.log(f"warning: step {step + 1}: {capped:.0%} of the completions ran to rl.max_new_tokens="
                     f"{self.rl.max_new_tokens} ({self.capped_start:.0%} at the start); lengths rising to the cap are a "
                     f"sign of reward hacking: check the answers, add a length reward or rl.beta")

    def loss(self, model, batch, examples: list[int]) -> torch.Tensor:
        total = None
        for i in examples:
            group = self.groups[i]
            if not self.rl.beta and not group.advantages.any():
                self._add("skipped_groups", 1.0, 1.0)
                continue  # all-equal rewards and no KL term: its gradient is exactly 0, so its passes are not run
            self._add("skipped_groups", 0.0, 1.0)
            ids, mask = group.tensors(self.pad_id, self.device)
            if self.rl.mask_truncated:
                mask = mask & ~group.truncated.to(mask.device)[:, None]
            logps, entropy = completion_logps(model, ids, len(group.prompt_ids), mask.shape[1], self.rl.temperature,
                                              with_entropy=True)
            per_token, stats = surrogate(logps, group.old_logps, group.ref_logps, group.advantages.to(logps.device), mask, self.rl)
            m = mask.float()
            if self.rl.loss == "grpo":
                value = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
            elif self.rl.loss == "dr_grpo":
                value = (per_token * m).sum() / (m.shape[0] * self.rl.max_new_tokens)
            else:  # dapo: over every completion token of the step's passes (token_scale = prompts / tokens)
                value = (per_token * m).sum() * self.token_scale
            tokens = float(m.sum())
            self._add("entropy", float((entropy * m).sum()), tokens)
            self._add("clip_ratio", stats["clipped"], tokens)
            if "kl" in stats:
                self._add("kl", stats["kl"], tokens)
            total = value if total is None else total + value
        return total if total is not None else torch.zeros((), device=self.device, requires_grad=True)

    def _add(self, key: str, value: float, tokens: float) -> None:
        sums = self.metrics.setdefault("_sums", {})
        s, n = sums.get(key, (0.0, 0.0))
        sums[key] = (s + value, n + tokens)

    def resume_state(self) -> dict | None:
        """With rl.updates > 1, the batch of rollouts the next steps may still train on: every process's groups (with
        their old and reference log-probs), so a run resumed between two updates goes on with the same rollouts
        instead of sampling new ones from the updated weights (on any number of processes: groups are keyed by
        example)."""
        if self.steps_per_batch == 1 or self.batch_id is None:
            return None
        mine = {i: {k: _cpu(getattr(g, k)) for k in GROUP_STATE} for i, g in self.groups.items()}
        groups = {i: g for part in _every_process(mine) for i, g in part.items()}
        return {"batch": self.batch_id, "groups": groups, "token_scale": self.token_scale,
                "rollout_metrics": self.rollout_metrics}

    def restore_state(self, state: dict) -> None:
        self.batch_id, self.token_scale = state["batch"], state["token_scale"]
        self.rollout_metrics = dict(state["rollout_metrics"])
        on_device = ("old_logps", "ref_logps")  # as _log_probs_before left them; the rest stays on the CPU
        self.groups = {i: Group(i, **{k: v.to(self.device) if k in on_device and v is not None else v for k, v in g.items()})
                       for i, g in state["groups"].items()}

    def step_metrics(self) -> dict:
        """The step's numbers; the token-weighted ones (entropy, clip_ratio, kl, skipped_groups) summed over every
        process first (a collective: every rank logs every step)."""
        out = {k: v for k, v in self.metrics.items() if k != "_sums"}
        out["update_seconds"] = round(time.perf_counter() - self.updating_since, 2)  # the passes and the optimizer step
        sums: dict[str, tuple[float, float]] = {}
        for part in _every_process(self.metrics.get("_sums", {})):
            for key, (s, n) in part.items():
                total, count = sums.get(key, (0.0, 0.0))
                sums[key] = (total + s, count + n)
        for key, (s, n) in sums.items():
            out[key] = round(s / n, 5) if n else None
        return out

    # -- measuring
    def measure(self, model, examples: list[Tokenized]) -> dict:
        """Greedy completions of the held-out prompts, scored by the rewards."""
        if not examples:
            return {}
        idx = [self._val_index[id(t)] for t in examples]
        was = model.training
        engine = Engine(model, self.tokenizer, max_rows=32)
        requests = [Request(self.data.val.tokens[i].input_ids.tolist(), Sampling(max_new_tokens=self.rl.max_new_tokens))
                    for i in idx]
        try:
            engine.run(requests)
        finally:
            model.train(was)
        rollouts = self._rollouts(self.data.val, idx, [r.text for r in requests], [r.output_ids for r in requests], per=1)
        total, table = score_all(self.rewards, rollouts)
        out = {"eval_reward": round(float(total.mean()), 5)}
        for reward, row in zip(self.rewards, table):
            known = row[~torch.isnan(row)]
            out[f"eval_reward_{reward.name}"] = round(float(known.mean()), 5) if len(known) else None
        lengths = torch.tensor([len(r.output_ids) for r in requests], dtype=torch.float64)
        out["eval_length"] = round(float(lengths.mean()), 2)
        out["eval_truncated"] = round(float(sum(r.finish_reason == "length" for r in requests) / len(requests)), 4)
        out["eval_prompts"] = len(requests)
        if self.headroom is not None:  # measured in prepare, before training: it joins the base's measurement, once
            out.update(flat_metrics(self.headroom))
            self.headroom = None
        return out

    def describe(self, m: dict) -> str:
        parts = ", ".join(f"{r.name} {m[f'eval_reward_{r.name}']:.3f}" for r in self.rewards
                          if m.get(f"eval_reward_{r.name}") is not None)
        return f"reward {m['eval_reward']:.3f} ({parts}), length {m['eval_length']:.1f} tokens"

    def results(self, before: dict, after: dict) -> list[str]:
        if not (before and after):
            return []
        lines = [f"held-out prompts ({after['eval_prompts']}, greedy): reward {before['eval_reward']:.3f} -> {after['eval_reward']:.3f}"]
        for r in self.rewards:
            b, a = before.get(f"eval_reward_{r.name}"), after.get(f"eval_reward_{r.name}")
            if b is not None and a is not None:
                lines.append(f"  {r.name}: {b:.3f} -> {a:.3f}")
        lines.append(f"  completion length {before['eval_length']:.1f} -> {after['eval_length']:.1f} tokens, cut at the cap "
                     f"{before['eval_truncated']:.0%} -> {after['eval_truncated']:.0%}")
        K = before.get("headroom_samples")
        if K and f"headroom_pass_at_{K}" in before:
            lines.append(f"  headroom before training ({before['headroom_prompts']} prompts): pass@1 "
                         f"{before['headroom_pass_at_1']:.1%}, pass@{K} {before[f'headroom_pass_at_{K}']:.1%}")
        return lines


def rollouts_for(examples: list, rendered: list, texts: list[str], completions: list[list[int]], per: int) -> Rollouts:
    """What the rewards see of `per` consecutive completions of each example's prompt: the record's columns, its
    `reference` (the response; "" when it has none) and `references` (several when the data has them)."""
    columns: dict[str, list] = {}
    prompts, conversations = [], []
    for ex, r in zip(examples, rendered):
        record = {**ex.columns, "reference": r.reference, "references": ex.references or [r.reference]}
        for key in record:
            columns.setdefault(key, [None] * len(prompts))
        for _ in range(per):
            for key in columns:
                columns[key].append(record.get(key))
            prompts.append(r.prompt)
            conversations.append(_prompt_messages(ex.messages))
    return Rollouts(prompts, texts, completions, conversations, columns)


def _prompt_messages(messages: list[dict]) -> list[dict]:
    """The conversation before the last assistant turn (what the completion answers)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    return messages[:last]


def _cpu(value):
    return value.cpu() if torch.is_tensor(value) else value


def _every_process(obj) -> list:
    """Every process's `obj`, in rank order (a collective under torchrun; tunesmith/collectives.py, shared with the loop)."""
    return gather(obj, joined())


GROUP_STATE = ("prompt_ids", "completions", "truncated", "rewards", "advantages", "old_logps", "ref_logps")


OBJECTIVE = OnlineRL
