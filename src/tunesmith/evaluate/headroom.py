"""`tunesmith eval RUN --samples K`: a run's headroom for RL, on held-out prompts -- pass@1 of the greedy answer
against pass@K of K samples (0/1 checks), and best-of-K against the mean (other rewards), with 95 % intervals
(objectives/headroom.py holds the statistics and the verdict; an RL run measures the same before its first step).

What "right" means: an RL run's own rewards (`rl.rewards`); any other run (an SFT warm-up) names it with `--check`,
one or more of

    numeric[:COLUMN]   the answer's final number (after `####`) equals the column's (default: the record's response)
    exact[:COLUMN]     the answer equals the column's, case and spacing aside
    countdown[:COLUMN] a number puzzle's working is right and ends on the column's target (builtin:countdown)
    regex:PATTERN      PATTERN is found in the answer (a format check)
    function:FILE.py:NAME   your reward function (TRL's signature), 0/1 for pass@k, any float for best-of-K
    model:RUN          a reward-model run's score (best-of-K)
    rouge[:COLUMN], bleu[:COLUMN], chrf[:COLUMN]   sentence scores against the references (best-of-K)

Prompts: the first `-n` of the run's validation split -- the ones the run's own check took before its first step
(its first rl.headroom_examples) and its held-out measurement scores (its first eval.max_examples), so `-n
rl.headroom_examples` measures the base on the prompts of the run's `headroom before training` line -- or, with
`--data`, the `-n` of the file that `tunesmith eval --data` scores.

Samples are drawn at the run's `rl.temperature` (1.0 for a run that is not RL) or `--temperature`, seeded per prompt
and sample, up to `--max-new-tokens` (default: rl.max_new_tokens for RL, eval.max_new_tokens otherwise). The tuned
model, the base (unless --no-base) and every `--runs` run are measured on the same prompts, each prompted as it was
trained. The result is kept as `evaluations/NNN-<data>-<n>-pass@K.json` (not evaluation.json: the report's is the
latest full evaluation).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tunesmith.assemble import assemble
from tunesmith.config import RewardFunction, load_config
from tunesmith.data.render import render
from tunesmith.errors import TunesmithError
from tunesmith.evaluate.closing import TRAINED, complete
from tunesmith.evaluate.evaluation import _load, _next_evaluation_path, eval_examples
from tunesmith.models import load_tokenizer, pick_device
from tunesmith.objectives.headroom import describe, measure_headroom
from tunesmith.objectives.rewards import build_rewards
from tunesmith.objectives.rl import rollouts_for
from tunesmith.run import RunDir
from tunesmith.run.files import write_json_atomic

CHECK_KINDS = ("numeric", "exact", "countdown", "regex", "function", "model", "rouge", "bleu", "chrf")


def parse_check(text: str) -> RewardFunction:
    """`--check KIND[:ARG]` as a reward (module docstring)."""
    kind, _, arg = text.partition(":")
    if kind not in CHECK_KINDS:
        raise TunesmithError(f"--check {text!r}: expected KIND[:ARG] with KIND one of {', '.join(CHECK_KINDS)} "
                             f"(e.g. --check numeric:answer)")
    if kind == "regex":
        if not arg:
            raise TunesmithError(f"--check {text!r}: a regex check needs its pattern (regex:'#### -?[0-9]+')")
        return RewardFunction(kind="regex", pattern=arg)
    if kind in ("function", "model"):
        if not arg or (kind == "function" and ":" not in arg):
            raise TunesmithError(f"--check {text!r}: expected {'function:FILE.py:NAME' if kind == 'function' else 'model:RUN'}")
        where = Path(arg.rsplit(":", 1)[0] if kind == "function" else arg).expanduser()
        if not (where.is_file() if kind == "function" else where.is_dir()):
            raise TunesmithError(f"--check {text!r}: no {'file' if kind == 'function' else 'run'} {str(where)!r}")
        return RewardFunction(kind=kind, path=arg)
    return RewardFunction(kind=kind, column=arg or None)


def evaluate_headroom(run_dir: Path, samples: int, data_path: str | None = None, n: int = 50,
                      checks: tuple[str, ...] = (), with_base: bool = True, other_runs: tuple[Path, ...] = (),
                      temperature: float | None = None, max_new_tokens: int | None = None, log=print) -> dict:
    if samples < 2:  # before anything loads
        raise TunesmithError(f"--samples {samples}: pass@K against pass@1 needs K >= 2 samples per prompt")
    if temperature is not None and temperature <= 0:
        raise TunesmithError(f"--temperature {temperature}: expected a temperature above 0 (pass@1 is the greedy answer)")
    run_dir = RunDir(run_dir)
    if not run_dir.final.is_dir():
        raise TunesmithError(f"{run_dir} has no final model (is it a finished tunesmith run?)")
    for other in other_runs:
        if not RunDir(other).final.is_dir():
            raise TunesmithError(f"--runs {other}: no final model (is it a finished tunesmith run?)")
    cfg = load_config(str(run_dir.config))
    specs = [parse_check(c) for c in checks] if checks else list(cfg.rl.rewards)
    if not specs:
        raise TunesmithError(f"{run_dir} is not an RL run, so it has no rewards to say which answers are right: name the "
                             f"check, e.g. --check numeric:answer (kinds: {', '.join(CHECK_KINDS)})")
    if run_dir.summary.exists() and json.loads(run_dir.summary.read_text()).get("state") == TRAINED:
        complete(run_dir, log)
    device = torch.device(pick_device())
    run = assemble(cfg, device, with_model=False)
    rl = run.task == "rl"
    # the run's validation split: its first n prompts, the ones its own headroom check and held-out measurement took
    # (the first rl.headroom_examples, eval.max_examples); a --data file: the n that `tunesmith eval` scores of it
    examples = eval_examples(run, cfg, data_path, n) if data_path else run.data.val.examples[:n]
    if not examples:
        raise TunesmithError("no evaluation examples (the run has no validation split; pass --data FILE)")
    for spec in specs:  # a column the data lacks: said now, not after minutes of sampling
        if spec.column and spec.column not in examples[0].columns and spec.column not in ("reference", "references"):
            raise TunesmithError(f"check {spec.label!r}: the data has no column {spec.column!r} (columns: "
                                 f"{', '.join(sorted(examples[0].columns))}); name one, e.g. --check {spec.kind}:COLUMN")
    rewards = build_rewards(specs, device)
    kinds = {spec.label: spec.kind for spec in specs}
    tokenizer = load_tokenizer(run_dir.final)
    rendered = [render(ex, cfg.data.template, tokenizer, False, cfg.data.system_prompt) for ex in examples]
    temperature = temperature or cfg.rl.temperature
    cap = max_new_tokens or (cfg.rl.max_new_tokens if rl else cfg.eval.max_new_tokens)
    models = {"tuned": run_dir.final, **{Path(p).name: RunDir(p).final for p in other_runs}}
    if with_base:
        models = {"base": run.model_dir, **models}
    log(f"headroom of {', '.join(models)} on {len(examples)} prompts from {data_path or 'the run validation split'}: "
        f"greedy + {samples} samples at temperature {temperature:g}, up to {cap} tokens; checks "
        + ", ".join(f"{s.label} ({s.kind})" for s in specs))
    result = {"task": "headroom", "data": data_path or "validation split", "examples": len(examples), "samples": samples,
              "temperature": temperature, "max_new_tokens": cap, "checks": [s.model_dump(exclude_none=True) for s in specs],
              "models": {}}
    for name, path in models.items():
        own_cfg = cfg if name in ("base", "tuned") else load_config(str(RunDir(path.parent).config))
        own_tokenizer = tokenizer if name in ("base", "tuned") else load_tokenizer(path)
        prompts = [render(ex, own_cfg.data.template, own_tokenizer, False, own_cfg.data.system_prompt).prompt for ex in examples]
        ids = own_tokenizer(prompts, add_special_tokens=own_cfg.data.template != "chat")["input_ids"]
        model = _load(path, run.precision.dtype, device)
        h = measure_headroom(model, own_tokenizer, ids,
                             lambda texts, out_ids, per: rollouts_for(examples, rendered, texts, out_ids, per),
                             rewards, kinds, samples, temperature, cfg.rl.top_p, cap, seed=cfg.train.seed)
        del model
        result["models"][name] = h
        log(f"{name}: {describe(h)}")
        for warning in h["warnings"]:
            log(f"  warning ({name}): {warning}")
    kept = _next_evaluation_path(run_dir, data_path, len(examples))
    kept = kept.with_name(f"{kept.stem}-pass@{samples}.json")
    write_json_atomic(kept, result)
    log(f"saved: {kept}")
    return result
