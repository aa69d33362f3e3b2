"""`tunesmith eval RUN_DIR`: the tuned model (and the base, and any other runs) on held-out data,
scored against the dataset's references -- never against another model's outputs.

Generative tasks: greedy, batched, KV-cached generation; ROUGE-1/2/L/Lsum, BLEU, chrF, METEOR,
exact match, the share of outputs that end on their own, generation tokens/s; a side-by-side
table with per-example ROUGE-L; the forgetting check against the base; with two or more models, the tuned model
against each other one per example (`rouge_against`: ROUGE-1 and ROUGE-L, the mean difference with a 95 % paired
bootstrap interval, examples higher / lower with an exact sign test). Classification:
accuracy, macro precision/recall/F1 and the majority-class baseline. Preference pairs (prompt /
chosen / rejected, what a DPO run trains on): each model's preference accuracies, its DPO rewards
against the base, and how many pairs the tuned model gets right that the base got wrong and the
reverse (with an exact sign-test p-value). Each evaluation is kept in the run directory's
`evaluations/` (numbered, never overwritten); evaluation.json holds the latest, which report.html shows.
"""
from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path

import torch

from tunesmith.assemble import assemble
from tunesmith.catalog import TASKS
from tunesmith.config import load_config
from tunesmith.data.classify import tokenize_classification
from tunesmith.data.prepare import load_examples, tokenize_pairs, with_answer_turn
from tunesmith.data.render import render
from tunesmith.data.shapes import resolve_task, user_text
from tunesmith.errors import TunesmithError
from tunesmith.evaluate import forgetting
from tunesmith.evaluate.closing import TRAINED, complete
from tunesmith.evaluate.human import sign_test, wilson
from tunesmith.evaluate.metrics import METEOR_MISSING, generation_metrics, rouge_each
from tunesmith.evaluate.report import write_report
from tunesmith.evaluate.side_by_side import build_rows
from tunesmith.methods.load import load_model, merge_adapter, reward_pooling
from tunesmith.models import load_tokenizer, pick_device
from tunesmith.models.generate import Sampling, generate
from tunesmith.objectives.classification import predict, scores
from tunesmith.objectives.preference import preference_scores, prefers_chosen, reference_logprobs
from tunesmith.objectives.reward import reward_scores, score_pairs
from tunesmith.objectives.rewards import build_rewards, score_all
from tunesmith.objectives.rl import rollouts_for
from tunesmith.run import RunDir
from tunesmith.run.files import write_json_atomic

BOOTSTRAP_RESAMPLES = 2000


def evaluate_run(run_dir: Path, data_path: str | None = None, n: int = 50, with_base: bool = True,
                 other_runs: tuple[Path, ...] = (), show: int = 8, max_new_tokens: int | None = None, log=print,
                 num_beams: int | None = None) -> dict:
    run_dir = RunDir(run_dir)
    if not run_dir.final.is_dir():
        raise TunesmithError(f"{run_dir} has no final model (is it a finished tunesmith run?)")
    if run_dir.summary.exists() and json.loads(run_dir.summary.read_text()).get("state") == TRAINED:
        complete(run_dir, log)  # its closing evaluation was interrupted: done first, then this evaluation
    cfg = load_config(str(run_dir.config))
    device = torch.device(pick_device())
    run = assemble(cfg, device, with_model=False)  # the run's base, data, task and precision, as it trained
    tokenizer = load_tokenizer(run_dir.final)
    models = {"tuned": run_dir.final}
    models.update({p.name: RunDir(p).final for p in other_runs})
    if with_base:
        models = {"base": run.model_dir, **models}
    examples = eval_examples(run, cfg, data_path, n)
    log(f"evaluating {', '.join(models)} on {len(examples)} examples from {data_path or 'the run validation split'}")
    result = measure(run.task, models, examples, tokenizer, cfg, run.precision.dtype, device, show, log, max_new_tokens,
                     num_beams)  # in the dtype the run trained in
    result = {"data": data_path or "validation split", "examples": len(examples), "task": run.task, **result}
    kept = _next_evaluation_path(run_dir, data_path, len(examples))
    write_json_atomic(kept, result)  # every evaluation is kept; evaluation.json is the latest, the report's source
    write_json_atomic(run_dir.evaluation, result)
    write_report(run_dir.path)
    log(f"saved: {kept} (and as {run_dir.evaluation}, the latest)")
    return result


def measure(task: str, models: dict, examples: list, tokenizer, cfg, dtype, device, show: int = 8, log=print,
            max_new_tokens: int | None = None, num_beams: int | None = None) -> dict:
    """`models` (name -> model folder) on `examples`, measured as `task` declares (`TaskShows.evaluates`, catalog.py)."""
    evaluates = TASKS[task].shows.evaluates
    if evaluates == "preference pairs":
        return _preference(models, examples, tokenizer, cfg, dtype, device, log)
    if evaluates == "reward pairs":
        return _reward(models, examples, tokenizer, cfg, dtype, device, log)
    if evaluates == "classification":
        return _classification(models, examples, cfg, dtype, device, log)
    # generation; "rewarded generation" (RL): the answers also scored by the run's rewards, up to its length
    rl = evaluates == "rewarded generation"
    sampling = Sampling(max_new_tokens=max_new_tokens or (cfg.rl.max_new_tokens if rl else cfg.eval.max_new_tokens),
                        num_beams=num_beams or cfg.eval.num_beams)
    return _generation(models, examples, tokenizer, cfg, dtype, device, show, sampling, log,
                       build_rewards(cfg.rl.rewards, device) if rl else None)


def eval_examples(run, cfg, data_path, n: int) -> list:
    """The examples an evaluation scores: `data_path`'s (which must have the run's shape; an RL run reads a pair file's
    prompts with the chosen answer as the reference, as in training) or the run's validation split, `n` of them spread
    over it. `tunesmith eval`, its `--samples` and its `--judge` all score these."""
    if data_path:
        fmt, examples, _ = load_examples(cfg.data, data_path)
        resolve_task(run.task, fmt)  # a file of another shape than the run trained on is an error naming both
        if TASKS[run.task].shows.evaluates == "rewarded generation":
            examples = [with_answer_turn(ex) for ex in examples]
    else:
        examples = run.data.val.examples
    examples = examples[:: max(1, len(examples) // n)][:n] if len(examples) > n else examples
    if not examples:
        raise TunesmithError("no evaluation examples (the run has no validation split; pass --data FILE)")
    return examples


def _next_evaluation_path(run_dir: RunDir, data_path: str | None, n: int) -> Path:
    """`evaluations/NNN-<data folder>-<file>-<n>.json`, numbered in the order they were made; never an existing file."""
    folder = run_dir.evaluations
    folder.mkdir(exist_ok=True)
    data = Path(data_path) if data_path else None
    what = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{data.parent.name}-{data.stem}" if data else "validation").strip("_.")
    number = 1 + max((int(q.name[:3]) for q in folder.glob("[0-9][0-9][0-9]-*.json")), default=0)
    return folder / f"{number:03d}-{what}-{n}.json"


def _load(path: Path, dtype, device):
    return merge_adapter(load_model(path, dtype, device).eval())  # generation as fast as a merged model


def _generation(models: dict, examples, tokenizer, cfg, dtype, device, show: int, sampling: Sampling, log,
                rewards: list | None = None) -> dict:
    """Generation metrics against the references; with `rewards` (an RL run's), each model's mean of every reward on
    its answers and, per example, the tuned model's total reward against each other model's: examples won / lost
    and the exact sign-test p-value."""
    rendered = [render(ex, cfg.data.template, tokenizer, False, cfg.data.system_prompt) for ex in examples]
    references = [ex.references or [r.reference] for ex, r in zip(examples, rendered)]
    outputs, metrics, speed, totals = {}, {}, {}, {}
    base_general = drift = None
    for name, path in models.items():
        model = _load(path, dtype, device)
        # each `--runs` run is prompted as it was trained: its own template, system prompt and tokenizer
        own_cfg = cfg if name in ("base", "tuned") else load_config(str(RunDir(path.parent).config))
        own_tokenizer = tokenizer if name in ("base", "tuned") else load_tokenizer(path)
        prompts = [render(ex, own_cfg.data.template, own_tokenizer, False, own_cfg.data.system_prompt).prompt
                   for ex in examples]
        t0 = time.perf_counter()
        gens = generate(model, own_tokenizer, prompts, sampling, add_special_tokens=own_cfg.data.template != "chat",
                        progress=name)
        secs = time.perf_counter() - t0
        outputs[name] = gens
        metrics[name] = {**generation_metrics([g.text for g in gens], references),
                         "ends_on_its_own": round(100 * sum(g.stopped for g in gens) / len(gens), 1)}
        speed[name] = round(sum(g.new_tokens for g in gens) / secs, 1)
        if rewards:
            rollouts = rollouts_for(examples, rendered, [g.text for g in gens], [[] for _ in gens], 1)
            totals[name], table = score_all(rewards, rollouts)
            metrics[name]["reward"] = round(float(totals[name].mean()), 5)
            for reward, row in zip(rewards, table):
                known = row[~torch.isnan(row)]
                metrics[name][f"reward_{reward.name}"] = round(float(known.mean()), 5) if len(known) else None
            metrics[name]["mean_new_tokens"] = round(sum(g.new_tokens for g in gens) / len(gens), 1)
        if name == "base":
            base_general = forgetting.measure_base(model, tokenizer)
        elif name == "tuned" and base_general:
            drift = forgetting.compare_to_base(model, base_general)
        log(f"{name}: " + ", ".join(f"{k} {v}" for k, v in metrics[name].items()) + f"; {speed[name]} generated tok/s")
        del model
    if "meteor" not in metrics.get("tuned", {}):
        log(METEOR_MISSING)
    k = min(show, len(examples))
    rows = build_rows([user_text(ex) for ex in examples[:k]], [r.reference for r in rendered[:k]],
                      {n: g[:k] for n, g in outputs.items()}, references[:k])
    result = {"metrics": metrics, "generation_tok_s": speed, "side_by_side": rows,
              "forgetting": drift, "outputs": {n: [g.text for g in gens] for n, gens in outputs.items()},
              "references": references}
    if len(outputs) > 1 and "tuned" in outputs:  # per example, so the same abstracts decide; ROUGE-1 and ROUGE-L
        each = {n: {t: torch.tensor(v, dtype=torch.float64) for t, v in
                    rouge_each([g.text for g in gens], references, ("rouge1", "rougeL")).items()} for n, gens in outputs.items()}
        result["rouge_against"] = {name: {t: _paired_scores(each[name][t], each["tuned"][t]) for t in ("rouge1", "rougeL")}
                                   for name in each if name != "tuned"}
        log("tuned against the others, ROUGE per example (mean difference, 95 % paired bootstrap; higher / lower, sign "
            "test): " + "; ".join(f"{name} " + ", ".join(
                f"{t} {v['mean_difference']:+.2f} ({v['mean_difference_ci95'][0]:+.2f} .. {v['mean_difference_ci95'][1]:+.2f}; "
                f"{v['won']} / {v['lost']}, p = {v['p_value']})" for t, v in per.items())
                for name, per in result["rouge_against"].items()))
    if rewards and len(totals) > 1:
        result["tuned_against"] = {name: _paired_scores(totals[name], totals["tuned"]) for name in totals if name != "tuned"}
        log("tuned against the others, examples with a higher / lower total reward: " + ", ".join(
            f"{k} {v['won']} / {v['lost']} (sign test p = {v['p_value']})" for k, v in result["tuned_against"].items()))
    return result


def _classification(models: dict, examples, cfg, dtype, device, log) -> dict:
    metrics, outputs, right = {}, {}, {}
    for name, path in models.items():
        if name == "base":
            continue  # a fresh head on the base is chance by construction; the majority class is the baseline
        model = _load(path, dtype, device)
        own_tokenizer = load_tokenizer(path)  # `--runs` may name a run on another base (an encoder beside a decoder)
        labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        cut = "truncate_left" if cfg.data.overlong == "truncate_left" else "truncate"  # every test text is scored
        _, _, tokens = tokenize_classification(examples, labels, own_tokenizer, cfg.data.max_length, cut, Counter())
        preds, total = predict(model, tokens, own_tokenizer.pad_token_id)
        metrics[name] = scores(preds, [t.label for t in tokens], total)
        outputs[name] = [labels[p] for p in preds]
        right[name] = torch.tensor([o == ex.label for o, ex in zip(outputs[name], examples)])
        log(f"{name}: " + ", ".join(f"{k} {v}" for k, v in metrics[name].items()))
        del model
    counts = Counter(ex.label for ex in examples)
    majority = counts.most_common(1)[0][1] / len(examples)
    f1_majority = (2 * majority / (1 + majority)) / len(counts)
    metrics["majority class"] = {"eval_accuracy": round(majority, 5), "eval_f1": round(f1_majority, 5)}
    result = {"metrics": metrics, "outputs": outputs, "references": [ex.label for ex in examples]}
    others = [name for name in right if name != "tuned"]
    if others:  # the same examples for every model, so a paired test separates smaller differences than two accuracies
        result["tuned_against"] = {name: _paired_counts(right[name], right["tuned"]) for name in others}
        log("tuned against the other runs, examples won / lost: " + ", ".join(
            f"{k} {v['won']} / {v['lost']} (sign test p = {v['p_value']})" for k, v in result["tuned_against"].items()))
    return result


def _one_tokenization(models: dict, tokenizer, cfg) -> None:
    """Pairs are tokenized once and every model scores the same tokens: a `--runs` run with another tokenizer is refused."""
    for name, path in models.items():
        if name not in ("base", "tuned") and load_tokenizer(path).get_vocab() != tokenizer.get_vocab():
            raise TunesmithError(f"--runs {path.parent}: its tokenizer differs from {cfg.model.name}'s; preference pairs are "
                                 f"compared on one tokenization, so evaluate that run on its own")


def every_pair(examples, tokenizer, cfg) -> list:
    """The test pairs, each scored: one over data.max_length loses its prompt's start (`truncate_left`), whatever the
    run trained with, as every test text of a classifier is scored (dropping the long ones would pick the test set;
    cutting their ends would read two answers cut to the same prompt, a tie). Only a pair whose answer alone is
    longer than max_length is left out (`examples` in the result counts the pairs scored)."""
    data = cfg.data.model_copy(update={"overlong": "truncate_left"})
    return tokenize_pairs(examples, data, tokenizer, cfg.data.max_length, Counter()).tokens


def _reward(models: dict, examples, tokenizer, cfg, dtype, device, log) -> dict:
    """Reward models on pairs: pairwise accuracy with its 95 % Wilson interval and the exact sign test of pairs scored
    right against pairs scored wrong (chance is 1/2); with `--runs`, the tuned model against each on the same pairs.
    The base is left out: its head is new and untrained, chance by construction."""
    _one_tokenization(models, tokenizer, cfg)
    pairs = every_pair(examples, tokenizer, cfg)
    metrics, right = {}, {}
    for name, path in models.items():
        if name == "base":
            continue
        model = load_model(path, dtype, device).eval()
        scores = score_pairs(model, pairs, tokenizer.pad_token_id, reward_pooling(path))  # as that run reads scores
        del model
        right[name] = scores[:, 0] > scores[:, 1]
        wins, losses = int(right[name].sum()), int((scores[:, 0] < scores[:, 1]).sum())  # ties are neither
        low, high = wilson(wins, wins + losses) if wins + losses else (0.0, 1.0)
        metrics[name] = {**reward_scores(scores, cfg.reward), "eval_accuracy_ci95": [round(low, 4), round(high, 4)],
                         "pairs_right": wins, "pairs_wrong": losses, "p_sign_test": round(sign_test(wins, losses), 6)}
        log(f"{name}: " + ", ".join(f"{k} {v}" for k, v in metrics[name].items()))
    result = {"metrics": metrics, "examples": len(pairs)}
    others = [name for name in right if name != "tuned"]
    if others:
        result["tuned_against"] = {name: _paired_counts(right[name], right["tuned"]) for name in others}
        log("tuned against the other runs, pairs won / lost: " + ", ".join(
            f"{k} {v['won']} / {v['lost']} (sign test p = {v['p_value']})" for k, v in result["tuned_against"].items()))
    return result


def _preference(models: dict, examples, tokenizer, cfg, dtype, device, log) -> dict:
    _one_tokenization(models, tokenizer, cfg)  # and scored against the tuned run's base
    pairs = every_pair(examples, tokenizer, cfg)
    logps = {}
    for name, path in models.items():
        model = _load(path, dtype, device)
        logps[name] = reference_logprobs(model, pairs, tokenizer.pad_token_id)
        del model
    base = logps.get("base")
    metrics = {name: preference_scores(lp, pairs, cfg.dpo, None if name == "base" else base) for name, lp in logps.items()}
    for name, m in metrics.items():
        log(f"{name}: " + ", ".join(f"{k} {v}" for k, v in m.items()))
    result = {"metrics": metrics, "examples": len(pairs)}  # the pairs that fit data.max_length
    if base is not None:
        tuned = logps["tuned"]
        result["against_base"] = {k: _paired_counts(prefers_chosen(base, pairs, per_token), prefers_chosen(tuned, pairs, per_token))
                                  for k, per_token in (("eval_seq_logp_accuracy", False), ("eval_logp_accuracy", True))}
        log("tuned against base, pairs won / lost: " + ", ".join(
            f"{k} {v['won']} / {v['lost']} (sign test p = {v['p_value']})" for k, v in result["against_base"].items()))
    return result


def _paired_scores(other: torch.Tensor, tuned: torch.Tensor) -> dict:
    """Examples where the tuned model scores higher (won) or lower (lost) than the other, ties left out, with the exact
    two-sided sign-test p-value; and the mean difference with its 95 % paired-bootstrap interval."""
    from scipy.stats import binomtest

    won, lost = int((tuned > other).sum()), int((tuned < other).sum())
    p = binomtest(won, won + lost).pvalue if won + lost else 1.0
    diff = (tuned - other).double()
    return {"won": won, "lost": lost, "p_value": round(p, 4), "mean_difference": round(float(diff.mean()), 5),
            "mean_difference_ci95": [round(v, 5) for v in paired_bootstrap(diff)]}


def paired_bootstrap(diff: torch.Tensor, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """95 % interval of the mean of per-example differences: the examples resampled with replacement (seeded, so an
    evaluation reads the same interval every time). A gain whose interval excludes 0 is not the luck of which
    examples were drawn -- it says nothing of a reseeded training run."""
    if len(diff) < 2:
        return float(diff.mean()), float(diff.mean())
    g = torch.Generator().manual_seed(seed)
    means = diff[torch.randint(len(diff), (resamples, len(diff)), generator=g)].mean(dim=1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=means.dtype))
    return float(low), float(high)


def _paired_counts(base_right: torch.Tensor, tuned_right: torch.Tensor) -> dict:
    """Items (pairs, examples) only the tuned model gets right (won) and only the other (the base) gets right (lost),
    with the exact two-sided sign-test p-value of that split (McNemar's exact test): the items both get right or
    wrong say nothing."""
    from scipy.stats import binomtest  # scipy comes with scikit-learn

    won, lost = int((tuned_right & ~base_right).sum()), int((base_right & ~tuned_right).sum())
    p = binomtest(won, won + lost).pvalue if won + lost else 1.0
    return {"won": won, "lost": lost, "p_value": round(p, 4)}
