"""The rewards online RL learns from (`rl.rewards`): each scores every sampled completion with a float, or None where
it does not apply (a record with no gold answer); several are summed with their weights and each is logged on its own.

    exact     1 if the answer equals the gold (`column`, or the record's response): case and spacing aside; a gold or an
              answer with GSM8K's `#### 42` line is compared on what follows the last `####`
    numeric   1 if the answer's final number equals the gold's (after `####` when there is one; commas, `$` and a
              trailing `.0` aside); None when the gold holds no number
    regex     1 if `pattern` is found in the answer (Python re, DOTALL), else 0: a format check
    length    1 inside [min_words, max_words], falling linearly to 0 at half the lower end and at twice the upper
    rouge     ROUGE-L F1 against the reference(s), the best of several; `bleu`, `chrf`: sacrebleu's sentence scores / 100
    function  a user's `file.py:function` called as TRL calls a reward function: keyword arguments `prompts`,
              `completions`, `completion_ids` and every data column (one list entry per completion); returns one
              float or None per completion
    model     a trained reward-model run (`task: reward`): its score of the conversation with the answer, rendered
              as that run rendered its training pairs

Our own small functions, not TRL's `trl.rewards`: TRL's accuracy reward needs math-verify and a LaTeX answer, and
TRL is not a dependency. A reward that returns the wrong number of scores or a non-number fails with its name.
"""
from __future__ import annotations

import importlib.util
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from tunesmith.errors import TunesmithError


@dataclass
class Rollouts:
    """What the rewards see of one batch of completions (one entry per completion; a prompt's G completions are
    consecutive). `columns`: the records' fields, plus `reference` (the record's response, "" when it has none) and
    `references` (several references when the data has them, else [reference])."""
    prompts: list[str]
    completions: list[str]
    completion_ids: list[list[int]]
    conversations: list[list[dict]]   # the prompt as messages (a reward model renders them with the answer)
    columns: dict[str, list]


@dataclass
class Reward:
    name: str
    weight: float
    score: Callable[[Rollouts], list]   # one float or None per completion


def build_rewards(specs, device: torch.device) -> list[Reward]:
    """The configured rewards (config.RewardFunction each), ready to score; names must be unique."""
    rewards = [Reward(spec.label, spec.weight, _scorer(spec, device)) for spec in specs]
    names = [r.name for r in rewards]
    if len(set(names)) != len(names):
        raise TunesmithError(f"rl.rewards: two rewards are called {next(n for n in names if names.count(n) > 1)!r}; "
                             f"give one a `name`")
    return rewards


ANSWER_COLUMN_KINDS = ("exact", "numeric", "countdown")  # compared with a gold answer: a column or the response


def check_columns(specs, columns: set[str], has_reference: bool) -> None:
    """Before any sampling: every reward that reads a column finds it in the data (`columns`: the records' fields), and
    one compared with the record's response (no `column`) has responses to compare with."""
    for k, spec in enumerate(specs):
        wanted = [spec.column] if spec.column else []
        if spec.kind == "countdown":
            wanted = [spec.column or "answer", "numbers"]
        for column in wanted:
            if column not in columns and column not in ("reference", "references"):
                raise TunesmithError(f"rl.rewards[{k}] ({spec.kind}): the data has no column {column!r} (columns: "
                                     f"{', '.join(sorted(columns))}); set `column` to the one holding the answer, or "
                                     f"map yours with data.columns")
        if spec.kind in ANSWER_COLUMN_KINDS and not wanted and not has_reference:
            raise TunesmithError(f"rl.rewards[{k}] ({spec.kind}): no `column` is set and the records have no response "
                                 f"to compare with (prompts only); set `column` to the data's answer column (columns: "
                                 f"{', '.join(sorted(columns))})")


def score_all(rewards: list[Reward], rollouts: Rollouts) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, per_reward): the weighted sum per completion (rewards that gave None left out; 0 if every one did) and a
    (rewards, completions) float64 table with NaN for None."""
    n = len(rollouts.completions)
    table = torch.full((len(rewards), n), float("nan"), dtype=torch.float64)
    for k, reward in enumerate(rewards):
        values = reward.score(rollouts)
        if not isinstance(values, (list, tuple)) or len(values) != n:
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
            raise TunesmithError(f"reward {reward.name!r} returned {got} for {n} completions; expected one float or None each")
        for i, v in enumerate(values):
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
                raise TunesmithError(f"reward {reward.name!r} gave {v!r} for completion {i}; expected a finite number or None")
            table[k, i] = float(v)
    weights = torch.tensor([r.weight for r in rewards], dtype=torch.float64)[:, None]
    total = torch.nansum(table * weights, dim=0)
    return total, table


# -- the built-in rewards ---------------------------------------------------------------------------------------------

NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def final_answer(text: str) -> str:
    """What follows the last `####` (GSM8K's answer line), or the whole text."""
    return text.rsplit("####", 1)[1] if "####" in text else text


def last_number(text: str) -> float | None:
    found = NUMBER.findall(final_answer(text))
    if not found:
        return None
    try:
        return float(found[-1].replace(",", "").replace("$", ""))
    except ValueError:
        return None


def numeric_match(completion: str, gold: str) -> float | None:
    want = last_number(str(gold))
    if want is None:
        return None
    got = last_number(completion)
    return float(got is not None and abs(got - want) < 1e-6 * max(1.0, abs(want)))


def _normal(text: str) -> str:
    return " ".join(final_answer(str(text)).split()).strip().lower().rstrip(".")


def exact_match(completion: str, gold: str) -> float:
    return float(_normal(completion) == _normal(gold))


def length_band(completion: str, low: int, high: int) -> float:
    words = len(completion.split())
    if low <= words <= high:
        return 1.0
    if words < low:
        floor = low / 2
        return max(0.0, (words - floor) / (low - floor)) if low > floor else 0.0
    return max(0.0, 1.0 - (words - high) / high)


def rouge_l(completion: str, references: list[str]) -> float:
    from rouge_score import rouge_scorer

    scorer = _ROUGE.get("scorer") or _ROUGE.setdefault("scorer", rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True))
    return max((scorer.score(ref, completion)["rougeL"].fmeasure for ref in references if ref), default=0.0)


_ROUGE: dict = {}


def _gold(rollouts: Rollouts, column: str | None, name: str) -> list:
    key = column or "reference"
    if key not in rollouts.columns:
        raise TunesmithError(f"reward {name!r}: the data has no column {key!r} (columns: {', '.join(sorted(rollouts.columns))})")
    return rollouts.columns[key]


def _references(rollouts: Rollouts, column: str | None, name: str) -> list[list[str]]:
    values = _gold(rollouts, column or "references", name)
    return [[str(x) for x in v] if isinstance(v, (list, tuple)) else [str(v)] for v in values]


def _scorer(spec, device: torch.device) -> Callable[[Rollouts], list]:
    kind, name = spec.kind, spec.label
    if kind == "exact":
        return lambda r: [exact_match(c, g) if g is not None else None for c, g in zip(r.completions, _gold(r, spec.column, name))]
    if kind == "numeric":
        return lambda r: [numeric_match(c, g) if g is not None else None for c, g in zip(r.completions, _gold(r, spec.column, name))]
    if kind == "regex":
        try:
            pattern = re.compile(spec.pattern, re.DOTALL)
        except re.error as e:
            raise TunesmithError(f"reward {name!r}: pattern {spec.pattern!r} is not a valid regular expression: {e}") from None
        return lambda r: [float(pattern.search(c) is not None) for c in r.completions]
    if kind == "length":
        return lambda r: [length_band(c, spec.min_words, spec.max_words) for c in r.completions]
    if kind == "rouge":
        return lambda r: [rouge_l(c, refs) for c, refs in zip(r.completions, _references(r, spec.column, name))]
    if kind in ("bleu", "chrf"):
        import sacrebleu

        sentence = sacrebleu.sentence_bleu if kind == "bleu" else sacrebleu.sentence_chrf
        return lambda r: [sentence(c, refs).score / 100 for c, refs in zip(r.completions, _references(r, spec.column, name))]
    if kind == "function":
        return _user_function(spec.path, name)
    if kind == "model":
        return RewardModelScorer(spec.path, device)
    if kind == "countdown":  # the number puzzles' checker lives with their generator (data/countdown.py)
        from tunesmith.data.countdown import check

        return lambda r: [check(c, n, g) for c, n, g in zip(r.completions, _gold(r, "numbers", name), _gold(r, spec.column or "answer", name))]
    raise TunesmithError(f"unknown reward kind {kind!r}")


def _user_function(path: str, name: str) -> Callable[[Rollouts], list]:
    file, _, function = path.rpartition(":")
    source = Path(file).expanduser()
    if not source.is_file():
        raise TunesmithError(f"reward {name!r}: {source} is not a file (expected file.py:function)")
    module_spec = importlib.util.spec_from_file_location(f"tunesmith_reward_{source.stem}", source)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise TunesmithError(f"reward {name!r}: importing {source} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise TunesmithError(f"reward {name!r}: {source} has no function {function!r}")

    def call(r: Rollouts) -> list:
        columns = {k: v for k, v in r.columns.items() if k not in ("prompts", "completions", "completion_ids")}
        return list(fn(prompts=r.prompts, completions=r.completions, completion_ids=r.completion_ids, **columns))

    return call


class RewardModelScorer:
    """A reward-model run's scores: each conversation plus answer rendered as the run rendered its pairs (its
    tunesmith_prompt.json: chat template and system prompt, or text template), read where that run reads them (its
    tunesmith_reward.json: the last token, or the mean over the answer's tokens)."""

    def __init__(self, path: str, device: torch.device, batch_size: int = 16):
        from tunesmith.methods.load import load_model, merge_adapter, prompt_format, reward_pooling
        from tunesmith.models import load_tokenizer, resolve_model_dir

        model_dir = resolve_model_dir(path)
        self.tokenizer = load_tokenizer(model_dir)
        self.format = prompt_format(model_dir)
        self.pooling = reward_pooling(model_dir)
        self.model = merge_adapter(load_model(model_dir, torch.float32, device)).eval()
        if getattr(self.model.config, "num_labels", None) != 1:
            raise TunesmithError(f"{path} is not a reward model (a sequence classifier with one score); train one with task=reward")
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.device, self.batch_size = device, batch_size

    def texts(self, r: Rollouts) -> list[tuple[str, str]]:
        """(the prompt as rendered for the answer, the prompt and the answer) per rollout."""
        if self.format.template == "chat":
            out = []
            for conv, answer in zip(r.conversations, r.completions):
                msgs = list(conv)
                if self.format.system_prompt and msgs[0]["role"] != "system":
                    msgs = [{"role": "system", "content": self.format.system_prompt}] + msgs
                out.append((self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                            self.tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": answer}], tokenize=False)))
            return out
        out = []
        for conv, answer in zip(r.conversations, r.completions):
            prompt = self.format.render(conv, self.tokenizer)
            out.append((prompt, prompt + answer + (self.tokenizer.eos_token or "")))
        return out

    @torch.no_grad()
    def __call__(self, r: Rollouts) -> list[float]:
        from tunesmith.models.heads import sequence_scores

        texts = self.texts(r)
        pad = self.tokenizer.pad_token_id  # the rule training read scores by (objectives/reward.py)
        add_special = self.format.template != "chat"
        scores: list[float] = []
        size = self.batch_size if pad is not None else 1  # no pad id: one text per pass, read at its end
        for s in range(0, len(texts), size):
            chunk = texts[s:s + size]
            ids = self.tokenizer([full for _, full in chunk], add_special_tokens=add_special)["input_ids"]
            width = max(len(x) for x in ids)
            batch = torch.full((len(ids), width), pad if pad is not None else 0, dtype=torch.long)
            for i, x in enumerate(ids):
                batch[i, :len(x)] = torch.tensor(x)
            answers = None
            if self.pooling == "mean":  # the tokens after the prompt's, as a pair's labels mark them in training
                prompts = self.tokenizer([prompt for prompt, _ in chunk], add_special_tokens=add_special)["input_ids"]
                answers = torch.zeros((len(ids), width), dtype=torch.bool)
                for i, (p, x) in enumerate(zip(prompts, ids)):  # after the tokens the text shares with its prompt alone
                    answers[i, len(os.path.commonprefix([p, x])):len(x)] = True  # (a merge across the boundary: where they part)
                answers = answers.to(self.device)
            scores.extend(sequence_scores(self.model, batch.to(self.device), pad, answers)[:, 0].tolist())
        return scores
