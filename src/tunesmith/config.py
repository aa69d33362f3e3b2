"""The one config schema: model, data, method, train, eval, output.

A recipe is a YAML file of these sections; `key=value` overrides use dotted keys
(`train.lr=1e-4`). Unknown or ill-typed keys fail here, before anything heavy
loads, with a one-line message naming the key, the value and what is allowed.
Every field's description doubles as its entry in docs/config.md.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunesmith.catalog import METHOD_NAMES, METHODS, TASK_NAMES, TASKS, methods_for
from tunesmith.errors import TunesmithError

RECIPES_DIR = Path(__file__).parent / "recipes"
DEFAULT_RECIPE = "docstrings"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: str = Field("smollm2-135m-instruct", description="Bundled short name (`smollm2-135m-instruct`, `minilm-l6`, `gemma3-270m`: README), a local HF folder, a local `.gguf` file, a tunesmith run dir, or a hub id (needs network).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Weight dtype (float16 is refused: no loss scaler). `auto`: float32 for full fine-tuning and BitFit (their updates need it; `train.mixed_precision` gives them bfloat16 matmuls); for other methods bfloat16 on GPUs that support it, and on a CPU with AMX for causal LoRA outside FSDP/DeepSpeed (adapters stay float32; 1.3x tokens/s over a 12-minute run at the same quality, docs/performance.md); else float32. The train log's `method:` line names the dtype chosen.")


class DataConfig(Section):
    path: Union[str, list[str]] = Field("builtin:docstrings", description="Training data: a file, glob or list (JSONL, JSON, CSV/TSV, Parquet, TXT, a `save_to_disk` folder), `builtin:docstrings` (one-line summaries of this Python's stdlib docstrings), or `datasets:NAME/FILE`: a public data set in the data folder (`--data-dir`, `$TUNESMITH_DATA_DIR`, default `~/.cache/tunesmith/data`; `tunesmith data get NAME` fills it, docs/data.md).")
    val_path: Optional[Union[str, list[str]]] = Field(None, description="Held-out data. When unset, `val_size` records are split off the training data.")
    format: Literal["auto", "text", "instruction", "prompt_completion", "chat", "sharegpt", "classification", "preference", "prompt"] = Field("auto", description="Record shape; `auto` detects it from the field names (`prompt`: prompts alone, for `task: rl`).")
    columns: dict[str, str] = Field(default_factory=dict, description="Map our field names to yours, e.g. `{instruction: question, output: answer}`.")
    template: str = Field("chat", description="`chat` (the tokenizer's chat template), a named text template (`alpaca`, `instruct`, `qa`), or your own with `{field}` placeholders; the text after the last placeholder's prompt part is the response.")
    system_prompt: Optional[str] = Field(None, description="System message added to chat-rendered examples that have none (the model's template may add its own default).")
    train_on_prompt: bool = Field(False, description="Also compute loss on prompt tokens (default: responses only; end-of-turn tokens are always trained).")
    max_length: int = Field(512, ge=8, description="Token cap per example (further capped by the model's context length).")
    overlong: Literal["drop", "truncate", "truncate_left"] = Field("drop", description="Examples longer than `max_length`: dropped, cut at the end (`truncate`), or cut at the start (`truncate_left`: the answer and the latest turns are kept, as a reward model reads the last token; a pair's two sides lose the same tokens); counts are always reported.")
    val_size: float = Field(0.1, ge=0, description="Held-out share (<1) or count (>=1) split off the training data when `val_path` is unset.")
    max_examples: Optional[int] = Field(None, ge=1, description="Use at most this many training records (after the split).")
    seed: int = Field(0, description="Seed for the train/validation split and shuffling.")
    dedup: bool = Field(False, description="Drop exact duplicate records (reported).")
    on_bad_record: Literal["fail", "skip"] = Field("fail", description="`fail` on the first malformed record, or `skip` bad records and report a summary.")
    cache: bool = Field(True, description="Reuse tokenized data from an earlier run with the same files (path, size, mtime), tokenizer and data settings (kept under `$TUNESMITH_CACHE/data`).")


class MethodConfig(Section):
    name: Literal[METHOD_NAMES] = Field(
        "lora", description="Fine-tuning method; see docs/methods.md for what each trains and which combine.")
    r: int = Field(16, ge=1, description="LoRA rank (`lora`, `qlora`, `lora-int8`).")
    alpha: float = Field(32, gt=0, description="LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with `rslora`).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout. 0 by default: on CPU the dropout masks cost ~6% of a step for no gain on short runs.")
    target_modules: Union[Literal["all-linear"], list[str], None] = Field(None, description="Modules to adapt (LoRA family, IA3); default: LoRA every linear layer of the blocks (`all-linear`), IA3 peft's per-architecture choice.")
    rslora: bool = Field(False, description="Rank-stabilised LoRA scaling.")
    loraplus_lr_ratio: Optional[float] = Field(None, gt=0, description="LoRA+ (`lora`, `qlora`, `lora-int8`): the B matrices learn at this multiple of `train.lr`, the A matrices at `train.lr` (the LoRA+ paper suggests 16 with a lower `train.lr`). Unset = one rate for both.")
    dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA); slower per step.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="`qlora`: 4-bit data type of the frozen base.")
    double_quant: bool = Field(True, description="`qlora`: also quantize the quantization constants (saves ~0.4 bit/param).")
    virtual_tokens: int = Field(20, ge=1, description="`prompt-tuning` / `prefix-tuning`: number of virtual tokens.")
    prompt_init: Literal["text", "vocab", "random"] = Field("text", description="`prompt-tuning` init: embeddings of `prompt_init_text` (repeated to length), of tokens sampled from the vocabulary, or random.")
    prompt_init_text: str = Field("Answer the request below accurately and concisely.", description="`prompt-tuning` text for `prompt_init: text`.")
    adapter_size: int = Field(64, ge=1, description="`adapters`: bottleneck width.")
    adapter_style: Literal["pfeiffer", "houlsby"] = Field("pfeiffer", description="`adapters`: after the feed-forward block only (pfeiffer), or after attention and feed-forward (houlsby).")
    freeze_embeddings: bool = Field(True, description="`full` only: keep the (tied) embeddings frozen.")
    freeze_layers: int = Field(0, ge=0, description="`full` and the LoRA family: the first N transformer blocks stay frozen (full fine-tuning trains none of their weights, LoRA puts no adapters there), so backward stops above them: less compute per token and less drift from the base.")


class TrainConfig(Section):
    max_steps: Optional[int] = Field(None, ge=1, description="Optimizer steps; when unset, `epochs` decides.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (fractions allowed) when `max_steps` is unset.")
    max_minutes: Optional[float] = Field(None, gt=0, description="Wall-clock budget for the training loop (model loading and the before/after evaluation are not counted): the step count and so the warm-up/decay schedule are planned from the measured step time and re-planned as it runs; stops at the budget, `max_steps` or `epochs`, whichever comes first, then evaluates and saves as usual.")
    lr: Optional[float] = Field(None, gt=0, description="Peak learning rate; unset = the method's tuned default (LoRA 1e-3, full 5e-5).")
    micro_batch_size: int = Field(8, ge=1, description="Examples per forward pass, at most (see batch_tokens). DPO runs each pair as a pass of its own (its two answers share the prompt's computation), so there it only sets the step size with grad_accum.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step (effective batch = micro_batch_size x grad_accum examples).")
    batch_tokens: Optional[int] = Field(1024, ge=16, description="Padded tokens per forward pass, at most: each step's length-grouped examples are split into passes within this budget, which bounds activation memory (an example longer than the budget gets its own pass). Unset = no token cap. Left at its default, runs whose passes compute in bfloat16 (bfloat16 weights, or full fine-tuning's bfloat16 weight copies) take 2048: half the bytes per activation, and faster on an AMX CPU (docs/performance.md); the run's config.yaml records the value used.")
    warmup: float = Field(0.05, ge=0, description="Warm-up: share of steps (<1) or a step count (>=1).")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate decay after warm-up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit"] = Field("adamw", description="`adamw8bit`/`paged_*` come from bitsandbytes (8-bit states save memory on big trainable sets; paged variants fall back to non-paged on CPU).")
    max_grad_norm: Optional[float] = Field(1.0, gt=0, description="Gradient clipping norm (unset = no clipping).")
    seed: int = Field(0, description="Seed for initialisation and batch order.")
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=list, description="Experiment trackers, all offline by default: TensorBoard event files, MLflow (SQLite store in the run dir), W&B offline mode. E.g. `[tensorboard]`.")
    save_every_steps: Optional[int] = Field(None, ge=1, description="Write a checkpoint every N optimizer steps (resume with `tunesmith train --resume RUN_DIR`).")
    select_best: Optional[str] = Field(None, description="Keep the weights with the best value of this held-out metric (`eval_loss` lowest; `eval_accuracy`, `eval_f1`, ... highest), saved to `best/` when it improves, and finish with them. Needs `eval.every_steps` or `eval.each_epoch`.")
    save_each_epoch: bool = Field(False, description="Also write a checkpoint at the end of every epoch.")
    keep_checkpoints: Optional[int] = Field(None, ge=1, description="Keep only the newest N checkpoints (the one with the best held-out loss is always kept); unset = keep all.")
    on_nonfinite: Literal["stop", "skip"] = Field("stop", description="A NaN/inf loss or gradient: `stop` the run (the last checkpoint stays), or `skip` that step's update and go on.")
    log_every_steps: int = Field(1, ge=1, description="Append a line to metrics.jsonl every N optimizer steps.")
    threads: Optional[int] = Field(None, ge=1, description="CPU threads; unset = the cores this process may use.")
    neftune_noise_alpha: Optional[float] = Field(None, gt=0, description="NEFTune: uniform noise of scale alpha / sqrt(length x width) on the input embeddings while training (not in evaluation or generation), as TRL's `neftune_noise_alpha`; the paper used 5-15. Unset = off. Generation tasks and classifiers; not DPO.")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing of the training loss (the target is (1 - e) one-hot + e uniform over the vocabulary or classes, as HF Trainer's `label_smoothing_factor`); held-out losses stay plain cross-entropy. 0 = off. Supervised fine-tuning (also on a teacher's answers, `distill.mode=sequence`) and classifiers; not DPO or logit distillation, whose targets are already soft.")
    mixed_precision: Literal["auto", "no", "bf16"] = Field("auto", description="`bf16`: training passes run their matmuls in bfloat16 over float32 weights (the optimizer's updates, gradients summed over a step and saved weights stay float32; held-out evaluation runs in float32). Full fine-tuning and BitFit train through bfloat16 copies of the weights refreshed once per step; the other methods under autocast. `auto`: on for full fine-tuning and BitFit of causal LMs under DDP or one process, on a device with fast bfloat16 (a GPU that supports it, a CPU with AMX): their updates are too small for bfloat16 weights (`model.dtype: auto` keeps them float32), while bfloat16 matmuls still gain speed (1.1-1.3x on an AMX CPU, docs/performance.md); off elsewhere. Not with FSDP / DeepSpeed or bfloat16/float16 weights. The log's `method:` line says when it is on.")
    gradient_checkpointing: bool = Field(False, description="Recompute block activations in backward: much less memory for long sequences / big batches, ~30% more compute. Off by default.")
    distributed: Literal["ddp", "fsdp", "deepspeed"] = Field("ddp", description="With several processes (`--nproc`, torchrun): `ddp` keeps a full model copy per process and sums gradients; `fsdp` (PyTorch FSDP2) shards weights, gradients and optimizer state across processes, each decoder block gathered only while it computes -- for models that do not fit one device; `deepspeed` runs DeepSpeed ZeRO (stage `zero_stage`, your `deepspeed_config` passed through; needs `pip install deepspeed`). Checkpoints are consolidated for all three, so a run can resume on another process count or backend. See docs/scaling.md.")
    process_timeout_minutes: float = Field(30, gt=0, description="With several processes: how long a collective waits for a process that does not come (one hung) before the run fails; a process that dies is noticed at once (its connection closes), and torchrun then stops the others (docs/scaling.md).")
    zero_stage: Literal[1, 2] = Field(2, description="`distributed=deepspeed`: ZeRO stage 1 (optimizer state partitioned across processes) or 2 (also gradients). For sharded weights (stage 3's job) use `distributed=fsdp`.")
    deepspeed_config: Optional[str] = Field(None, description="`distributed=deepspeed`: a DeepSpeed JSON config whose settings are passed through (e.g. `zero_optimization` bucket sizes, `overlap_comm`, `offload_optimizer`); the batch sizes, accumulation, clipping, optimizer and schedule are tunesmith's (`train.*`) and may not be set there.")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value):  # YAML reads a bare `no` (mixed_precision: no, train.mixed_precision=no) as false
        return "no" if value is False else value


class EvalConfig(Section):
    every_steps: Optional[int] = Field(None, ge=1, description="Held-out metrics every N optimizer steps (always before and after training).")
    each_epoch: bool = Field(False, description="Also evaluate at the end of every epoch.")
    max_examples: int = Field(64, ge=1, description="Held-out examples used for the loss.")
    samples: int = Field(4, ge=0, description="Held-out examples shown side by side (base vs tuned vs reference) at the end.")
    max_new_tokens: int = Field(64, ge=1, description="Generation length cap for the side-by-side table.")
    num_beams: int = Field(1, ge=1, le=16, description="Beam search width for evaluation outputs (side-by-side table, `tunesmith eval`); 1 = greedy. Wider beams cost proportionally more generation time.")


class DpoConfig(Section):
    beta: Optional[float] = Field(None, gt=0, description="DPO/IPO/hinge: strength of the pull towards the reference model (higher = stay closer); SimPO: the scale of its length-normalised reward; ORPO: the weight of the odds-ratio term next to the chosen answer's NLL. Unset = 0.1, or 2.0 for SimPO (the papers' and TRL's defaults).")
    loss: Literal["sigmoid", "ipo", "hinge", "simpo", "orpo"] = Field("sigmoid", description="`sigmoid` (DPO), `ipo`, `hinge`; or the reference-free `simpo` (SimPO: mean per-token log-probs, a target margin `simpo_gamma`) and `orpo` (ORPO: NLL of the chosen answer + beta x an odds-ratio term): no reference pass, so each step is cheaper.")
    simpo_gamma: float = Field(0.5, ge=0, description="`loss: simpo`: the target reward margin gamma (TRL's `simpo_gamma`).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Assumed share of flipped preference labels (conservative DPO).")
    sft_weight: float = Field(0.0, ge=0, description="Adds this weight x the chosen answer's mean per-token negative log-likelihood to each pair's loss (RPO, TRL's `rpo_alpha`): keeps the chosen answers likely while DPO separates the pair. 0 = plain DPO; e.g. 1.0.")


class RewardConfig(Section):
    margin: float = Field(0.0, ge=0, description="`task: reward`: the chosen answer's score must beat the rejected one's by this much before the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected - margin) lets go of a pair (Llama 2's margin loss with one margin). 0 = plain Bradley-Terry.")
    center_coefficient: float = Field(0.0, ge=0, description="`task: reward`: adds this weight x (r_chosen + r_rejected)^2 per pair, which keeps the scores centred on 0 (TRL's `center_rewards_coefficient`; e.g. 0.01): a reward used in RL then needs no offset.")
    pooling: Literal["last", "mean"] = Field("last", description="`task: reward`: where an answer's score is read. `last`: at the last token, as transformers' sequence classifiers read it (plain AutoModelForSequenceClassification gives the same score; what TRL expects of a reward model). `mean`: the score head at every token of the answer, averaged (the head applied to the answer's mean hidden state); it generalises better from a few thousand pairs (docs/results.md), and the saved model says so in final/tunesmith_reward.json, which tunesmith's eval and RL read; plain transformers needs the few lines in docs/methods.md.")


class RewardFunction(Section):
    """One reward of `task: rl` (objectives/rewards.py): `kind` picks it, the other fields configure it."""
    kind: Literal["exact", "numeric", "regex", "length", "rouge", "bleu", "chrf", "function", "model", "countdown"] = Field(
        description="`exact`: 1 if the answer equals the `column`'s value (whitespace and case aside), else 0; `numeric`: 1 if the "
                    "last number in the answer equals the column's (the number after `####` in GSM8K-style answers); `regex`: 1 if "
                    "`pattern` matches the answer (re.search; `^...$` for the whole answer); `length`: 1 inside [`min_words`, "
                    "`max_words`], falling off linearly to 0 at half/double the band; `rouge` (ROUGE-L F), `bleu`, `chrf`: "
                    "sentence scores in [0, 1] against the `column` (the data's response or `references` when unset); "
                    "`function`: your `path`, `file.py:function` with TRL's signature (prompts, completions, dataset columns "
                    "as keyword arguments -> a float or None per completion); `model`: a reward-model run (`path`: its run "
                    "dir or final/), its score of prompt + answer; `countdown`: 1 if the answer's `a op b = c` lines are right, use "
                    "the record's `numbers` each once and end on the `column`'s target (default `answer`; builtin:countdown).")
    weight: float = Field(1.0, description="Its weight in the total reward (each reward is also logged on its own).")
    column: Optional[str] = Field(None, description="`exact`, `numeric`, `rouge`, `bleu`, `chrf`: the data column holding the answer or reference (e.g. `answer`). Unset: the record's response (its completion / output / assistant turn), or its `references`.")
    pattern: Optional[str] = Field(None, description="`regex`: the pattern an answer must contain (Python re, DOTALL).")
    min_words: Optional[int] = Field(None, ge=0, description="`length`: the band's lower end in words.")
    max_words: Optional[int] = Field(None, ge=1, description="`length`: the band's upper end in words.")
    path: Optional[str] = Field(None, description="`function`: `file.py:function`; `model`: a reward-model run.")
    name: Optional[str] = Field(None, description="What the logs call it (default: the kind, or the function's name).")

    @model_validator(mode="after")
    def _complete(self):
        need = {"regex": "pattern", "function": "path", "model": "path"}.get(self.kind)
        if need and not getattr(self, need):
            raise ValueError(f"a reward of kind {self.kind} needs `{need}`")
        if self.kind == "length" and (self.min_words is None or self.max_words is None or self.min_words > self.max_words):
            raise ValueError("a reward of kind length needs min_words <= max_words")
        if self.kind == "function" and ":" not in self.path:
            raise ValueError(f"path {self.path!r}: expected file.py:function")
        return self

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.kind == "function":
            return self.path.rsplit(":", 1)[1]
        return self.kind


class RLConfig(Section):
    algorithm: Literal["grpo", "rloo"] = Field("grpo", description="`grpo`: advantage = reward - its group's mean (divided by the group's std with `scale_rewards: group`); `rloo`: reward - the mean of the group's other completions (REINFORCE leave-one-out), unscaled.")
    loss: Literal["grpo", "dr_grpo", "dapo"] = Field("dapo", description="How token losses are averaged: `grpo` per completion, then over completions (favours short answers); `dr_grpo` summed over a group's tokens / (completions x rl.max_new_tokens), no length bias; `dapo` over every completion token of a pass (TRL's default).")
    group_size: int = Field(8, ge=2, description="Completions sampled per prompt (TRL's num_generations). `train.micro_batch_size` counts prompts, so a step trains micro_batch_size x grad_accum x group_size completions.")
    max_new_tokens: int = Field(128, ge=1, description="Completion length cap; a completion cut here counts as truncated.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts (the log-probs are taken at it too).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the rollouts (1 = off).")
    beta: float = Field(0.0, ge=0, description="Weight of the KL penalty to the reference model (k3 estimator, per token). 0 = no reference pass (TRL's default). Adapter methods use the base with the adapter switched off; full fine-tuning keeps a frozen copy of the starting weights.")
    epsilon: float = Field(0.2, gt=0, description="Clip range of the probability ratio (PPO's epsilon).")
    epsilon_high: Optional[float] = Field(None, gt=0, description="Upper clip range (DAPO's clip-higher, e.g. 0.28); unset = epsilon.")
    updates: int = Field(1, ge=1, description="Optimizer steps per batch of rollouts (TRL's num_iterations, mu): the rollouts and their old log-probs are kept for this many consecutive steps, so a step after the first is an update on the same completions, clipped.")
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="`grpo`: divide advantages by the std of the group's rewards, of the step's rewards, or not (Dr. GRPO recommends none). `rloo` never scales.")
    mask_truncated: bool = Field(False, description="Completions cut at rl.max_new_tokens take no part in the loss (DAPO's overlong filtering).")
    importance: Literal["token", "sequence"] = Field("token", description="The probability ratio of the clipped surrogate: `token`, one per answer token (GRPO, PPO); `sequence`, one per answer, exp of the mean per-token log-ratio over its tokens, clipped as a whole (GSPO, TRL's `importance_sampling_level: sequence`; GSPO uses small clip ranges, e.g. epsilon 3e-4, epsilon_high 4e-4). Differs from `token` only with rl.updates > 1 (on a batch's first update every ratio is 1).")
    overlong_penalty: float = Field(0.0, ge=0, description="Subtracted from the total reward of an answer that never ends: cut at rl.max_new_tokens without an end-of-sequence token (TRL's `missing_eos_penalty`, e.g. 1.0). With rl.overlong_buffer, a soft ramp instead (DAPO's overlong punishment). Logged as `overlong_penalty` (the step's mean). 0 = off.")
    overlong_buffer: int = Field(0, ge=0, description="With rl.overlong_penalty: the penalty ramps linearly from 0 at (rl.max_new_tokens - buffer) answer tokens to the full rl.overlong_penalty at rl.max_new_tokens (DAPO's soft overlong punishment: L_cache = buffer, L_max = max_new_tokens; e.g. a quarter of the cap). 0 = only answers cut at the cap are penalised.")
    headroom_examples: int = Field(32, ge=0, description="Before the first step, a run measures its headroom on the first this many held-out prompts (those the held-out measurement scores first): pass@1 of the greedy answer against pass@K of rl.headroom_samples samples (per reward; best-of-K for rewards that are not 0/1), logged to train.log, metrics.jsonl (step 0) and eval.json's `before`, with a warning when there is little to gain (docs/methods.md, \"Using RL well\"). 0 = off.")
    headroom_samples: int = Field(8, ge=0, description="K of the headroom check: answers sampled per held-out prompt at rl.temperature (0 = off; otherwise at least 2).")
    rewards: list[RewardFunction] = Field(default_factory=list, description="The rewards, summed with their weights: a list of `{kind, weight, column, pattern, min_words, max_words, path, name}` (docs/methods.md, \"Online RL\"), e.g. `[{kind: numeric, column: answer}, {kind: regex, pattern: \"#### -?[0-9]+\", weight: 0.2}]`.")

    @field_validator("headroom_samples")
    @classmethod
    def _k_at_least_two(cls, value):
        if value == 1:
            raise ValueError("pass@K against pass@1 needs at least 2 samples per prompt (0 turns the check off)")
        return value

    @model_validator(mode="after")
    def _buffer_below_cap(self):
        if self.overlong_buffer >= self.max_new_tokens:
            raise ValueError(f"rl.overlong_buffer ({self.overlong_buffer}) must be below rl.max_new_tokens ({self.max_new_tokens})")
        return self


class DistillConfig(Section):
    teacher: Optional[str] = Field(None, description="Teacher model (anything `model.name` accepts, e.g. a tuned run dir). Set = distillation into the student (`model.name` + `method`).")
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the cross-entropy on the data's labels; 1 - alpha weighs the teacher's soft targets.")
    temperature: float = Field(2.0, gt=0, description="Softmax temperature of the soft targets (the KL term is scaled by T^2).")
    kl: Literal["forward", "reverse"] = Field("forward", description="`forward`: KL(teacher || student), mass-covering; `reverse`: KL(student || teacher), mode-seeking.")
    mode: Literal["logits", "sequence"] = Field("logits", description="`logits`: match the teacher's next-token distributions (tokenizers must match); `sequence`: train on the teacher's greedy answers to the training prompts (any tokenizer).")
    top_k: Optional[int] = Field(None, ge=1, description="Logit distillation from a cache: one teacher pass over the training split before training keeps each response token's top-k teacher logits on disk (k x 6 bytes per token, memory-mapped), the teacher is freed, and every epoch distils against the cache (teacher renormalised over its top k; forward KL). Pays off from the second epoch and when the teacher would not fit next to the student. Unset = the teacher runs every step on the full vocabulary. E.g. 64.")


def check_name(name: str, key: str = "output.name") -> str:
    """A run name is one plain path component: not empty, `.` or `..`, no separator, no control character (a name
    like `..` once made `--overwrite` delete the working folder)."""
    bad = (not name or name in (".", "..") or "/" in name or "\\" in name or Path(name).is_absolute()
           or any(ord(c) < 32 or ord(c) == 127 for c in name))
    if bad:
        raise TunesmithError(f"config key {key!r} has value {name!r}: a run name is one folder name (not empty, "
                             f"'.' or '..'; no '/', '\\' or control characters)")
    return name


class OutputConfig(Section):
    dir: str = Field("runs", description="Parent folder of run directories.")
    name: Optional[str] = Field(None, description="Run directory name, one folder name (no `/`, not `.` or `..`); unset = `<recipe>-<date>-<time>`. An existing run of that name is replaced only with `tunesmith train --overwrite` (a command-line decision a recipe cannot make), and only if tunesmith made it.")
    resume: Literal["never", "auto"] = Field("never", description="`auto`: when the run directory `output.name` exists with a checkpoint and no final model (or with nothing yet, after a stop before the first checkpoint), continue it instead of refusing.")

    @field_validator("name")
    @classmethod
    def _one_folder(cls, value):
        return value if value is None else check_name(value)


class Config(Section):
    recipe: str = Field(DEFAULT_RECIPE, description="Name of the recipe this config came from (informational).")
    task: Literal[("auto",) + TASK_NAMES] = Field("auto", description="`causal`: generate text (SFT); `classification`: a sequence classifier with a head for the data's labels; `dpo`: preference tuning on prompt/chosen/rejected pairs (see `dpo`); `reward`: a reward model, one scalar score per answer trained on the same pairs (see `reward`); `rl`: online reinforcement learning from rewards on prompts (GRPO / RLOO, see `rl`); `auto`: decided by the data's shape.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    dpo: DpoConfig = Field(default_factory=DpoConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)


# ---------------------------------------------------------------- loading

def list_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise TunesmithError(f"{path}: not valid YAML: {e}".replace("\n", " ")) from None
    except OSError as e:
        raise TunesmithError(f"{path}: cannot read: {e.strerror}") from None
    if not isinstance(data, dict):
        raise TunesmithError(f"{path}: expected a mapping of sections (model, data, method, train, eval, output), got {type(data).__name__}")
    return data


def load_config(source: Optional[str] = None, overrides: list[str] = ()) -> Config:
    """Resolve a recipe name or YAML path (default: the built-in default recipe) plus dotted overrides."""
    recipes = list_recipes()
    source = source or DEFAULT_RECIPE
    if source in recipes:
        raw = read_yaml(recipes[source])
        raw.setdefault("recipe", source)
    else:
        path = Path(source)
        if not path.exists():
            hint = _suggest(source, recipes)
            raise TunesmithError(f"no recipe or config file named {source!r}{hint}; built-in recipes: {', '.join(recipes)}")
        raw = read_yaml(path)
        raw.setdefault("recipe", path.stem)
    for item in overrides:
        apply_override(raw, item)
    return validate(raw)


def apply_override(raw: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise TunesmithError(f"override {item!r} is not key=value (e.g. train.lr=1e-4)")
    parts = key.strip().split(".")
    node = raw
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise TunesmithError(f"override {key!r}: {p!r} is not a section")
        node = nxt
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise TunesmithError(f"override {item!r}: the value is not valid YAML: {e}".replace("\n", " ")) from None


def validate(raw: dict) -> Config:
    output = raw.get("output")
    if isinstance(output, dict) and "overwrite" in output:
        if output["overwrite"] not in (False, None):
            raise TunesmithError("config key 'output.overwrite' is not read from a recipe: replacing a run is a command-line "
                                 "decision (tunesmith train ... --overwrite)")
        raw = {**raw, "output": {k: v for k, v in output.items() if k != "overwrite"}}  # written by older versions
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        raise TunesmithError(_explain(e.errors()[0], raw)) from None
    check_combinations(cfg)
    return judged_run_prompts(cfg)


def judged_run_prompts(cfg: Config) -> Config:
    """Data that is a run's judgements (`runs/NAME/judgements.jsonl`, data/judgements.py) is rendered as the judged run
    rendered its prompts: an unset `data.system_prompt` is taken from that run's config.yaml (and so recorded in this
    run's config and served with its model), and a template or system prompt other than the judged run's is refused."""
    path = Path(cfg.data.path).expanduser() if isinstance(cfg.data.path, str) else None
    if path is None or path.name != "judgements.jsonl" or not (path.parent / "config.yaml").is_file():
        return cfg
    judged = read_yaml(path.parent / "config.yaml").get("data") or {}
    template, system_prompt = judged.get("template", "chat"), judged.get("system_prompt")
    if cfg.data.system_prompt is None and system_prompt:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"system_prompt": system_prompt})})
    for key, theirs, ours in (("template", template, cfg.data.template), ("system_prompt", system_prompt, cfg.data.system_prompt)):
        if ours != theirs:
            raise TunesmithError(f"{path} judges answers to prompts rendered with data.{key}: {theirs!r} (the judged run's "
                                 f"config.yaml), but this config has {ours!r}; set data.{key} as the judged run had it")
    return cfg


def check_reward_paths(cfg: Config) -> None:
    """Before anything loads: every `function` reward's file and every `model` reward's run exist (recipes name them,
    e.g. hh-grpo's `runs/hh-reward`, so a missing one is the usual first error)."""
    if cfg.task != "rl":
        return
    for k, reward in enumerate(cfg.rl.rewards):
        if reward.kind == "function" and not Path(reward.path.rsplit(":", 1)[0]).expanduser().is_file():
            raise TunesmithError(f"rl.rewards[{k}] (kind: function): no file {reward.path.rsplit(':', 1)[0]!r} (path is "
                                 f"file.py:function)")
        if reward.kind == "model" and not Path(reward.path).expanduser().is_dir():
            named = _newest_finished_run(Path(reward.path).expanduser())
            found = (f"; the newest finished run of that recipe is {named}: pass "
                     f'"rl.rewards=[{{kind: model, path: {named}}}]"') if named else (
                "; train one (`tunesmith train hh-reward output.name=NAME`, or task=reward on your pairs) and pass "
                '"rl.rewards=[{kind: model, path: runs/NAME}]"')
            raise TunesmithError(f"rl.rewards[{k}] (kind: model): no reward-model run {reward.path!r}{found}")


def check_start_run(cfg: Config) -> None:
    """Before anything loads: a `model.name` inside the runs folder (`runs/NAME`, as arithmetic-grpo names its warm-up
    run) exists, else one line that says which run to pass or which recipe makes it (it was a hub lookup's error)."""
    name = Path(cfg.model.name).expanduser()
    if name.exists() or name.parent != Path(cfg.output.dir).expanduser():
        return
    named = _newest_finished_run(name)
    if named:
        hint = f"; the newest finished run of that recipe is {named}: pass model.name={named}"
    elif name.name in list_recipes():
        hint = f"; train it first: `tunesmith train {name.name}` (or pass model.name=runs/YOUR_RUN)"
    else:
        hint = "; pass model.name= a finished run, a local model folder or a bundled name"
    raise TunesmithError(f"model.name: no run {cfg.model.name!r}{hint}")


def _newest_finished_run(missing: Path) -> Optional[Path]:
    """The newest `<name>-<date>-<time>` folder beside a missing run `<name>` that holds a final model (an unnamed run
    of recipe `name` is called that: output.name)."""
    runs = [p for p in missing.parent.glob(f"{missing.name}-*") if (p / "final").is_dir()] if missing.parent.is_dir() else []
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def check_combinations(cfg: Config, task: Optional[str] = None) -> None:
    """Settings that are each valid but do not go together. `task` is the resolved task once the data is known."""
    task = task or (cfg.task if cfg.task != "auto" else None)
    spec = METHODS[cfg.method.name]
    if task and task not in spec.tasks:
        raise TunesmithError(f"method.name={cfg.method.name} is not supported for task={task} "
                             f"({spec.why(task)}); use one of {', '.join(methods_for(task))}")
    if cfg.train.distributed == "deepspeed" and (not spec.deepspeed or cfg.train.optimizer != "adamw"
                                                 or cfg.train.on_nonfinite == "skip"):
        raise TunesmithError("train.distributed=deepspeed runs with train.optimizer=adamw, train.on_nonfinite=stop and a method whose "
                             "weights are not quantized (not qlora / lora-int8); use train.distributed=ddp for those")
    if cfg.train.mixed_precision == "bf16" and (cfg.train.distributed != "ddp" or cfg.model.dtype in ("bfloat16", "float16")):
        raise TunesmithError(f"train.mixed_precision=bf16 runs matmuls in bfloat16 over float32 weights, not built for "
                             f"model.dtype={cfg.model.dtype} with train.distributed={cfg.train.distributed}: set "
                             f"model.dtype=float32 (or auto) and train.distributed=ddp, or train.mixed_precision=no")
    if cfg.model.dtype == "float16":
        raise TunesmithError("model.dtype=float16 trains without a loss scaler here, so small gradients underflow to zero "
                             "and large activations overflow: use bfloat16 (same memory) or float32")
    if cfg.train.distributed != "deepspeed" and cfg.train.deepspeed_config:
        raise TunesmithError("train.deepspeed_config is only read with train.distributed=deepspeed")
    if cfg.train.distributed == "fsdp" and not spec.shardable:
        raise TunesmithError(f"train.distributed=fsdp does not support method.name={cfg.method.name} "
                             f"(quantized and virtual-token weights cannot be sharded as DTensors); use one of "
                             f"{', '.join(n for n, m in METHODS.items() if m.shardable)}, or train.distributed=ddp")
    if cfg.method.loraplus_lr_ratio and (not spec.lora_family or cfg.train.distributed == "deepspeed"):
        raise TunesmithError(f"method.loraplus_lr_ratio sets the rate of LoRA's B matrices: it needs method.name one of "
                             f"{', '.join(n for n, m in METHODS.items() if m.lora_family)} (not {cfg.method.name}) and not "
                             f"train.distributed=deepspeed")
    if cfg.dpo.loss == "orpo" and cfg.dpo.sft_weight:
        raise TunesmithError("dpo.sft_weight adds an NLL term on the chosen answer, which dpo.loss=orpo already has "
                             "(dpo.beta weighs the odds-ratio term against it); set dpo.sft_weight=0")
    if cfg.train.neftune_noise_alpha and task == "dpo":
        raise TunesmithError("train.neftune_noise_alpha is for supervised fine-tuning, classifiers and reward models: with task=dpo the "
                             "reference model's log-probs would be computed on noisy embeddings too; unset it")
    if cfg.train.label_smoothing and (task in ("dpo", "reward") or (cfg.distill.teacher and cfg.distill.mode != "sequence")):
        raise TunesmithError("train.label_smoothing smooths the one-hot targets of supervised fine-tuning and classifiers; "
                             "preference pairs' and logit distillation's targets are not one-hot: unset it (or distill.mode=sequence)")
    if cfg.distill.teacher and task == "reward":
        raise TunesmithError("distill.teacher distils a teacher's next-token distributions or answers; a reward model has "
                             "neither: unset distill.teacher for task=reward")
    if task == "rl":
        if not cfg.rl.rewards:
            raise TunesmithError("task=rl learns from rewards: set rl.rewards, e.g. rl.rewards=[{kind: numeric, column: answer}] "
                                 "(kinds: exact, numeric, regex, length, rouge, bleu, chrf, function, model; docs/methods.md)")
        if cfg.distill.teacher or cfg.train.label_smoothing or cfg.train.neftune_noise_alpha:
            raise TunesmithError("task=rl trains on its own sampled completions: distill.teacher, train.label_smoothing and "
                                 "train.neftune_noise_alpha do not apply; unset them")
        if cfg.train.distributed != "ddp":
            raise TunesmithError("task=rl generates its rollouts on each process's whole model: train.distributed=fsdp and "
                                 "deepspeed are not built for it; use train.distributed=ddp")
    elif cfg.rl.rewards:
        raise TunesmithError(f"rl.rewards is read by task=rl only (this run is task={task or cfg.task})")
    if cfg.method.freeze_layers and not spec.freeze_layers:
        raise TunesmithError(f"method.freeze_layers is not built for method.name={cfg.method.name}; use one of "
                             f"{', '.join(n for n, m in METHODS.items() if m.freeze_layers)}, or method.freeze_layers=0")
    if cfg.distill.top_k and (cfg.distill.kl == "reverse" or cfg.distill.mode == "sequence" or task == "classification"):
        raise TunesmithError("distill.top_k caches vocabulary logits for forward-KL logit distillation: it does not combine with "
                             "distill.kl=reverse, distill.mode=sequence or classification (whose few class logits are used whole)")
    best = cfg.train.select_best
    if best:
        allowed = TASKS[task].metrics if task else tuple(dict.fromkeys(m for t in TASKS.values() for m in t.metrics))
        if best not in allowed:
            raise TunesmithError(f"config key 'train.select_best' has value {best!r}; expected one of {', '.join(allowed)}")
        if not (cfg.eval.every_steps or cfg.eval.each_epoch):
            raise TunesmithError("train.select_best needs held-out evaluations during training: set eval.every_steps or eval.each_epoch=true")


def unused_settings(cfg: Config) -> list[str]:
    """The method.* keys this config sets away from their defaults that its method does not read (e.g. method.r=8 on
    a full fine-tune): the run says so in its log rather than ignoring them in silence (a recipe compared across
    methods keeps its LoRA rank)."""
    reads = set(METHODS[cfg.method.name].settings) | {"name"}
    defaults = MethodConfig()
    return [f"method.{k}" for k in MethodConfig.model_fields
            if k not in reads and getattr(cfg.method, k) != getattr(defaults, k)]


def _explain(err: dict, raw: dict) -> str:
    loc = [str(x) for x in err["loc"] if not isinstance(x, int)]
    # pydantic appends union member names ("str", "list[str]") to the location; keep real keys only
    loc = _real_path(loc)
    key = ".".join(loc)
    value = _lookup(raw, loc)
    model = _section_model(loc[:-1])
    if err["type"] == "extra_forbidden":
        allowed = list(model.model_fields) if model else []
        hint = _suggest(loc[-1], allowed)
        return f"unknown config key {key!r}{hint}; allowed in {'.'.join(loc[:-1]) or 'top level'}: {', '.join(allowed)}"
    field = model.model_fields.get(loc[-1]) if model else None
    allowed = describe_allowed(field) if field else err["msg"]
    return f"config key {key!r} has value {value!r}: {err['msg'].lower()}; expected {allowed}"


def _real_path(loc: list[str]) -> list[str]:
    """Config keys only: pydantic appends union member names ("str", "list[str]") after the field."""
    out, model = [], Config
    for part in loc:
        out.append(part)
        field = model.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            break
        model = field.annotation
    return out


def _section_model(loc: list[str]):
    model = Config
    for part in loc:
        field = model.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def _lookup(raw: dict, loc: list[str]) -> Any:
    node: Any = raw
    for p in loc:
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return node


def describe_allowed(field) -> str:
    ann = field.annotation
    text = ann.__name__ if isinstance(ann, type) else str(ann).replace("typing.", "").replace("NoneType", "null")
    for c in field.metadata:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(c, attr, None) is not None:
                text += f" {sym} {getattr(c, attr)}"
    return text


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def changed_settings(before: dict, after: dict, prefix: str = "") -> list[str]:
    """`section.key: old -> new` for each setting that differs between two dumped configs (e.g. a run's config.yaml
    and the settings it is resumed with)."""
    changed = []
    for key in sorted(before.keys() | after.keys()):
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += changed_settings(old, new, f"{prefix}{key}.")
        elif old != new:
            changed.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return changed


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
