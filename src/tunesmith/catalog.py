"""What exists, declared once: the fine-tuning methods and the tasks a run can train, each with the facts that
config validation, `tunesmith plan`, the CLI, the tests and the support matrix in docs/methods.md read.

Light on purpose (no torch, no peft): config validation reads it before anything heavy loads. A method's code is
its module (`MethodSpec.module`, imported when a run uses it, `tunesmith.methods.get_method`); a task's objective
is chosen in `tunesmith.objectives.for_task`. Adding a method is one module and one `MethodSpec` here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
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
class TaskSpec:
    name: str
    objective: str                   # its module in tunesmith.objectives
    data: str                        # what data it trains on (error messages)
    formats: tuple[str, ...]         # data formats (data/shapes.py) that train this task
    metrics: tuple[str, ...]         # held-out metrics train.select_best may name
    lower_is_better: tuple[str, ...] = ("eval_loss", "eval_ppl")
    head: str = "vocabulary"         # what the model ends in: the vocabulary, or a sequence classifier's `classes`
                                     # (one per label; one scalar for a reward model)


SFT_FORMATS = ("text", "instruction", "prompt_completion", "chat", "sharegpt")
TASKS: dict[str, TaskSpec] = {s.name: s for s in (
    TaskSpec("causal", "sft", "generation data", SFT_FORMATS, ("eval_loss", "eval_ppl", "eval_token_accuracy")),
    TaskSpec("classification", "classification", "text + label records", ("classification",),
             ("eval_loss", "eval_accuracy", "eval_f1", "eval_precision", "eval_recall"), head="classes"),
    TaskSpec("dpo", "preference", "prompt/chosen/rejected pairs", ("preference",),
             ("eval_loss", "eval_reward_accuracy", "eval_reward_margin", "eval_logp_accuracy", "eval_seq_logp_accuracy")),
    TaskSpec("reward", "reward", "prompt/chosen/rejected pairs", ("preference",),
             ("eval_loss", "eval_accuracy", "eval_margin"), head="classes"),
    # online RL: the prompts of any generation format or of preference pairs (a response, or a pair's chosen answer, is
    # the rewards' reference)
    TaskSpec("rl", "rl", "prompts (optionally with answer or reference columns)", ("prompt",) + SFT_FORMATS[1:] + ("preference",),
             ("eval_reward",), lower_is_better=()),
)}


def task_of_format(data_format: str) -> str:
    """The task data in this format trains (`task: auto`; preference pairs: dpo, the first that reads them)."""
    return next(t.name for t in TASKS.values() if data_format in t.formats)


def has_class_head(task: str) -> bool:
    """The task's model is a sequence classifier (AutoModelForSequenceClassification): classification, reward."""
    return TASKS[task].head == "classes"


def methods_for(task: str) -> tuple[str, ...]:
    return tuple(name for name, spec in METHODS.items() if task in spec.tasks)
