"""What exists, declared once: the fine-tuning methods and the tasks a run can train, each with the facts that
config validation, `tunesmith plan`, the CLI, the tests and the support matrix in docs/methods.md read.

Light on purpose (no torch, no peft): config validation reads it before anything heavy loads. A method's code is
its module (`MethodSpec.module`, imported when a run uses it, `tunesmith.methods.get_method`); a task's objective
is chosen in `tunesmith.objectives.for_task`. Adding a method is one module and one `MethodSpec` here.

What the product shows of a task's run is declared with the task too (`TaskShows`): its headline held-out metric and
direction, the charts of its metrics.jsonl, report.html's verdict, what `tunesmith eval` measures and what `tunesmith
compare` tabulates. `tunesmith plan`, the report, compare, eval, the closing evaluation and the studio read it
(`describe_task`, `task_shows_json` for the page), so none of them knows a task by name.
"""
from __future__ import annotations

import json

from dataclasses import asdict, dataclass, field
from typing import Mapping

TASK_NAMES = ("causal", "classification", "dpo", "reward", "rl")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    module: str                      # tunesmith.methods.<module>: apply(), save(), optional quantization()
    default_lr: float                # tuned peak learning rate (train.lr unset)
    trains: str                      # one line: what it trains (docs/methods.md)
    tasks: tuple[str, ...]           # where it is built and tested
    why_not: Mapping[str, str] = field(default_factory=dict)  # task -> why it is not supported there
    updates_base: bool = False       # trains the model's own weights (full, BitFit): float32 weights under dtype auto
    weight_grads: bool = False       # backward computes every weight matrix's gradient (3x the forward's FLOPs, not 2x)
    quantized_bits: int | None = None  # the frozen base is loaded in 4 or 8 bits (bitsandbytes)
    output: str = "peft adapter"     # what final/ holds: a peft adapter (plain peft loads it), a transformers folder,
                                     # or a tunesmith folder (the trained tensors + what to rebuild them on)
    mergeable: bool = True           # folds into the base architecture: HF export merged, GGUF export
    shardable: bool = True           # train.distributed=fsdp (weights as DTensors)
    freeze_layers: bool = False      # method.freeze_layers applies
    lora_family: bool = False        # method.loraplus_lr_ratio applies
    bf16_on_amx: bool = False        # model.dtype=auto gives bfloat16 weights for causal runs on a CPU with AMX
    settings: tuple[str, ...] = ()   # the method.* keys it reads (besides `name`)

    @property
    def deepspeed(self) -> bool:
        """DeepSpeed ZeRO runs methods whose weights are not quantized."""
        return self.quantized_bits is None

    def why(self, task: str) -> str:
        return self.why_not.get(task) or {"dpo": "not verified with preference pairs",
                                          "reward": "not verified with a reward head",
                                          "rl": "not verified with online RL"}.get(task, "not built")


VIRTUAL_TOKENS_ON_ENCODERS = "virtual tokens in front of an encoder's [CLS] position leave the classifier reading a prompt vector"
LORA_SETTINGS = ("r", "alpha", "dropout", "target_modules", "rslora", "loraplus_lr_ratio", "dora", "freeze_layers")
PROMPT_SETTINGS = ("virtual_tokens", "prompt_init", "prompt_init_text")

METHODS: dict[str, MethodSpec] = {s.name: s for s in (
    MethodSpec("full", "full", 5e-5, "every weight (optionally not the embeddings or the first N blocks)",
               TASK_NAMES, output="transformers folder", updates_base=True, weight_grads=True, freeze_layers=True,
               settings=("freeze_embeddings", "freeze_layers")),
    # LoRA's 1e-3 is a high rate for short CPU budgets: with rank 16 on every linear layer the default 60-step docstring
    # run goes from held-out loss 4.05 to 3.26 at 1e-3. Not yet compared systematically against other rates.
    MethodSpec("lora", "lora", 1e-3, "low-rank adapters on the linear layers; the base frozen",
               TASK_NAMES, freeze_layers=True, lora_family=True, bf16_on_amx=True, settings=LORA_SETTINGS),
    MethodSpec("qlora", "qlora", 1e-3, "LoRA adapters over a 4-bit (NF4/FP4) base",
               ("causal", "dpo", "reward", "rl"), {"classification": "bitsandbytes' CPU 4-bit backward fails on BERT-style encoders here "
                                                     "(in-place op on a view of a leaf)"},
               quantized_bits=4, shardable=False, freeze_layers=True, lora_family=True,
               settings=LORA_SETTINGS + ("quant_type", "double_quant")),
    MethodSpec("lora-int8", "lora_int8", 1e-3, "LoRA adapters over an 8-bit (LLM.int8) base",
               ("causal", "dpo", "reward", "rl"), {"classification": "not verified with a classification head yet"},
               quantized_bits=8, shardable=False, freeze_layers=True, lora_family=True, settings=LORA_SETTINGS),
    # IA3: peft's default rates make it look useless; it needs a rate ~10x LoRA's.
    MethodSpec("ia3", "ia3", 1e-2, "per-channel scales of keys, values and the feed-forward input",
               ("causal", "classification", "dpo", "reward"), settings=("target_modules",)),
    MethodSpec("prompt-tuning", "prompt_tuning", 3e-2, "virtual input embeddings in front of every sequence",
               ("causal",), {"classification": VIRTUAL_TOKENS_ON_ENCODERS}, mergeable=False, shardable=False,
               settings=PROMPT_SETTINGS),
    MethodSpec("prefix-tuning", "prefix_tuning", 1e-2, "virtual keys and values in every attention layer",
               ("causal",), {"classification": VIRTUAL_TOKENS_ON_ENCODERS}, mergeable=False, shardable=False,
               settings=PROMPT_SETTINGS),
    MethodSpec("adapters", "adapters", 1e-3, "bottleneck layers after the feed-forward (and attention) outputs",
               ("causal", "classification", "dpo", "reward"), output="tunesmith folder", mergeable=False, settings=("adapter_size", "adapter_style")),
    MethodSpec("bitfit", "bitfit", 5e-3, "the bias terms (plus a classification head)",
               ("causal", "classification"), output="tunesmith folder", updates_base=True),
)}
METHOD_NAMES = tuple(METHODS)


@dataclass(frozen=True)
class Curve:
    """One line of a chart: a metrics.jsonl key against the step (`*` stands for one part of the key, one line each:
    `rewards/*/mean` draws every reward, labelled with its name)."""
    key: str
    label: str
    held_out: bool = False           # measured at evaluations (points joined by lines)
    smooth: bool = False             # a noisy per-step value: also drawn as a moving average
    dashed: bool = False


@dataclass(frozen=True)
class Chart:
    """One panel of a run's charts (report.html's figures, the studio's run page)."""
    title: str
    y: str                           # the y axis
    curves: tuple[Curve, ...]
    figure: str = "training"         # report.html's figure: "training" (every run) or "rollouts" (online RL's health)
    skip: str = ""                   # rows where this metrics.jsonl key is true are left out (RL: `rollout_reused`)
    share: bool = False              # values are shares of 0..1: the axis is fixed to them


@dataclass(frozen=True)
class Detail:
    """One part of the verdict's parenthesis, `label before -> after`."""
    key: str                         # a summary metric; ending in "_": every metric with that prefix, comma-joined,
                                     # each named by the rest of its key
    label: str = ""
    fmt: str = ".3f"
    unit: str = ""                   # after the values (" tokens")


@dataclass(frozen=True)
class Verdict:
    """What report.html's verdict says: `label before -> after (details; note)` and whether the fine-tune helped."""
    metric: str                      # the summary's held-out metric it judges
    label: str                       # e.g. "held-out accuracy"
    fmt: str = ".3f"                 # of the values (".1%": fractions as percentages)
    good: str = "rises"              # helped when the metric "rises", "falls", or ends "above chance" (0.5)
    before_default: float | None = None  # "before" when the base was not measured; None: no claim without it
    change: bool = False             # first in the parenthesis: the relative change ("-12%")
    details: tuple[Detail, ...] = ()
    note: str = ""                   # last in the parenthesis


@dataclass(frozen=True)
class TaskShows:
    """Everything the product shows of a task's run, declared once with the task."""
    headline: str                    # the held-out metric that says how a run did (eval.json's before/after, the
                                     # studio's runs table, `tunesmith compare` when `compare_headline`)
    higher_is_better: bool
    label: str                       # what the headline is called ("held-out accuracy")
    percent: bool                    # the headline is a fraction shown as a percentage
    verdict: Verdict
    charts: tuple[Chart, ...]        # the run's charts, the first the main one (the studio's run page)
    evaluates: str                   # what `tunesmith eval` measures: one of EVALUATIONS
    compare_headline: bool           # compare tabulates the headline (x100 when `percent`); False: side-by-side ROUGE-L
    compare_kind: str                # the line under compare's table: what its "task metric" column is


# what `tunesmith eval` can measure (evaluate/evaluation.py has one function each)
EVALUATIONS = ("generation", "rewarded generation", "classification", "reward pairs", "preference pairs")
ROUGE_KIND = "mean ROUGE-L of greedy outputs against the references on the side-by-side examples"

TRAIN_LOSS = Curve("loss", "train loss (per step)", smooth=True)
LEARNING_RATE = Chart("learning rate", "lr", (Curve("lr", "learning rate"),))
SPEED = Chart("real tokens / s (cumulative)", "tokens/s", (Curve("tok_s", "tokens/s"),))


def loss_charts(held_out: str = "held-out loss") -> tuple[Chart, ...]:
    """The charts every run has: train and held-out loss, learning rate, speed."""
    return (Chart("loss", "loss", (TRAIN_LOSS, Curve("eval_loss", held_out, held_out=True))), LEARNING_RATE, SPEED)


def _loss_task(loss_label: str, **kw) -> TaskShows:
    """A generative task judged by its held-out loss (lower is better), compared by side-by-side ROUGE-L."""
    shows = dict(headline="eval_loss", higher_is_better=False, label=loss_label, percent=False,
                 verdict=Verdict("eval_loss", loss_label, good="falls", change=True), charts=loss_charts(loss_label),
                 evaluates="generation", compare_headline=False, compare_kind=ROUGE_KIND)
    return TaskShows(**{**shows, **kw})


CAUSAL_SHOWS = _loss_task("held-out loss on the responses")
CLASSIFICATION_SHOWS = TaskShows(
    "eval_accuracy", True, "held-out accuracy", True,
    Verdict("eval_accuracy", "held-out accuracy", ".1%", before_default=0, details=(Detail("eval_f1", "macro-F1"),)),
    loss_charts(), "classification", True, "held-out accuracy (%) on the validation split")
DPO_SHOWS = TaskShows(
    "eval_reward_accuracy", True, "held-out preference accuracy", True,
    Verdict("eval_loss", "held-out preference loss", good="falls", change=True,
            details=(Detail("eval_reward_accuracy", "reward accuracy"),)),
    loss_charts("held-out preference loss"), "preference pairs", False, ROUGE_KIND)
REWARD_SHOWS = TaskShows(
    "eval_accuracy", True, "held-out pairwise accuracy", True,
    Verdict("eval_accuracy", "held-out pairwise accuracy", ".1%", good="above chance", before_default=0.5,
            details=(Detail("eval_margin", "mean margin chosen - rejected", "+.3f"),), note="before: a new, untrained head"),
    loss_charts("held-out pairwise loss"), "reward pairs", True,
    "held-out pairwise accuracy (%, the chosen answer scored above the rejected) on the validation split")
RL_SHOWS = TaskShows(
    "eval_reward", True, "held-out reward", False,
    Verdict("eval_reward", "held-out reward", before_default=0,
            details=(Detail("eval_reward_"), Detail("eval_length", "answer length", ".0f", " tokens"))),
    (Chart("reward (mean of the step's answers)", "reward",
           (Curve("reward", "total"), Curve("rewards/*/mean", "*"), Curve("eval_reward", "held-out (greedy)", held_out=True),
            Curve("frac_reward_zero_std", "groups with equal rewards", dashed=True)), "rollouts", "rollout_reused"),
     Chart("loss", "loss", (TRAIN_LOSS,)), LEARNING_RATE, SPEED,
     Chart("shares", "share", (Curve("frac_reward_zero_std", "groups with equal rewards"),
                               Curve("clipped_ratio", "answers cut at the cap"),
                               Curve("clip_ratio", "tokens clipped by the surrogate")), "rollouts", "rollout_reused", True),
     Chart("answer length (tokens)", "tokens", (Curve("completion_length", "answer length"),), "rollouts", "rollout_reused"),
     Chart("entropy, KL (nats/token)", "nats/token", (Curve("entropy", "entropy"), Curve("kl", "KL to the reference")),
           "rollouts", "rollout_reused")),
    "rewarded generation", True, "mean total reward of the answers to the validation prompts")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    objective: str                   # its module in tunesmith.objectives (else any module, by its full name)
    data: str                        # what data it trains on (error messages)
    formats: tuple[str, ...]         # data formats (data/shapes.py) that train this task
    metrics: tuple[str, ...]         # held-out metrics train.select_best may name
    lower_is_better: tuple[str, ...] = ("eval_loss", "eval_ppl")
    head: str = "vocabulary"         # what the model ends in: the vocabulary, or a sequence classifier's `classes`
                                     # (one per label; one scalar for a reward model): what `tunesmith plan` estimates
    shows: TaskShows = CAUSAL_SHOWS  # what the product shows of its runs


SFT_FORMATS = ("text", "instruction", "prompt_completion", "chat", "sharegpt")
TASKS: dict[str, TaskSpec] = {s.name: s for s in (
    TaskSpec("causal", "sft", "generation data", SFT_FORMATS, ("eval_loss", "eval_ppl", "eval_token_accuracy")),
    TaskSpec("classification", "classification", "text + label records", ("classification",),
             ("eval_loss", "eval_accuracy", "eval_f1", "eval_precision", "eval_recall"), head="classes",
             shows=CLASSIFICATION_SHOWS),
    TaskSpec("dpo", "preference", "prompt/chosen/rejected pairs", ("preference",),
             ("eval_loss", "eval_reward_accuracy", "eval_reward_margin", "eval_logp_accuracy", "eval_seq_logp_accuracy"),
             shows=DPO_SHOWS),
    TaskSpec("reward", "reward", "prompt/chosen/rejected pairs", ("preference",),
             ("eval_loss", "eval_accuracy", "eval_margin"), head="classes", shows=REWARD_SHOWS),
    # online RL: the prompts of any generation format or of preference pairs (a response, or a pair's chosen answer, is
    # the rewards' reference)
    TaskSpec("rl", "rl", "prompts (optionally with answer or reference columns)", ("prompt",) + SFT_FORMATS[1:] + ("preference",),
             ("eval_reward",), lower_is_better=(), shows=RL_SHOWS),
)}


def task_of_format(data_format: str) -> str:
    """The task data in this format trains (`task: auto`; preference pairs: dpo, the first that reads them)."""
    return next(t.name for t in TASKS.values() if data_format in t.formats)


def has_class_head(task: str) -> bool:
    """The task's model is a sequence classifier (AutoModelForSequenceClassification): classification, reward."""
    return TASKS[task].head == "classes"


def describe_task(task: str) -> TaskShows | None:
    """What the product shows of a run of `task` (None for a name no task has: a run whose config cannot be read)."""
    spec = TASKS.get(task)
    return spec.shows if spec else None


def task_shows_json(task: str) -> dict | None:
    """`describe_task` as plain JSON-ready data (lists for tuples), for the studio's server to send to its page."""
    shows = describe_task(task)
    return json.loads(json.dumps(asdict(shows))) if shows else None


def lower_is_better(metric: str, task: str | None = None) -> bool:
    """Whether a lower `metric` is better: as `task` declares it, or (no task) as any task does."""
    specs = [TASKS[task]] if task in TASKS else TASKS.values()
    return any(metric in s.lower_is_better for s in specs)


def methods_for(task: str) -> tuple[str, ...]:
    return tuple(name for name, spec in METHODS.items() if task in spec.tasks)
