"""What a training step optimises and how a run's quality is measured, one module per objective:

    sft             supervised fine-tuning: cross-entropy on the response tokens
    classification  a sequence classifier's cross-entropy; accuracy and macro-F1
    preference      DPO, IPO, hinge, SimPO, ORPO on prompt/chosen/rejected pairs
    reward          a reward model: one score per answer, Bradley-Terry on the same pairs
    rl              online RL (GRPO, RLOO): sample a group of answers per prompt, score them with rewards, and
                    push up the better ones (the clipped surrogate); rewards.py holds the reward functions
    distill         a teacher's soft targets (logits, or a top-k cache of them), or training on its answers
                    (`distill.mode: sequence`), around the student's own objective

Every objective has the same shape, `Objective` below. The loop (train/loop.py) keeps what is common to all of them:
forward passes and accumulation, sharding over processes, the cadence of evaluations and checkpoints, stop requests;
it asks the objective what a pass's loss is, what a step's loss is averaged over, and how the model does on the
held-out split. Which objective a task trains is its `TaskSpec.objective` in tunesmith.catalog: adding one is a
module here (with `OBJECTIVE = TheClass`) and a line there.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from tunesmith.catalog import TASKS
from tunesmith.data.render import IGNORE, PreparedData, Tokenized
from tunesmith.models.generate import Sampling, generate


@dataclass
class Context:
    """What an objective may use from the run around it while it prepares (loading a teacher, reference passes)."""
    device: torch.device
    log: Callable[[str], None] = print
    main: bool = True                                   # this process writes files (rank 0 of several)
    sync: Callable[[], None] = lambda: None             # every process waits here (after rank 0's writes)
    passes: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext  # where training passes run
    measure: Callable[[object], dict] | None = None     # held-out metrics as the loop takes them (sharded under DDP)
    cache_dir: Path | None = None                       # a folder of the run for caches (the teacher's top-k logits)
    batch_tokens: int | None = None                     # padded tokens per forward pass


class Objective:
    """The shape every objective has. `train` and `val` are the tokenized splits it trains and measures on (an
    objective may replace the training one: sequence distillation trains on a teacher's answers)."""

    task: str = "causal"
    examples_per_pass: int | None = None  # examples in one forward pass at most; None: train.micro_batch_size
    measure_shards: bool = False          # held-out metrics add up over shares of the split (one per process)
    generates: bool = True                # samples are generated text, scored against references (ROUGE-L)
    checks_forgetting: bool = False       # the run checks the tuned model on general text against the base

    def __init__(self, cfg, data: PreparedData, tokenizer):
        self.cfg, self.data, self.tokenizer = cfg, data, tokenizer
        self.pad_id = tokenizer.pad_token_id
        self.train: list[Tokenized] = data.train.tokens
        self.val: list[Tokenized] = data.val.tokens[: cfg.eval.max_examples]

    # -- before training
    def load(self, ctx: Context, examples_needed: int) -> None:
        """Load what the objective needs besides the model (a teacher), before the step count is planned."""

    def prepare(self, model, ctx: Context) -> None:
        """Once the run folder exists, before the base is measured: reference log-probs, a teacher's cache."""
        self.prepare_measure(model)

    def prepare_measure(self, base) -> None:
        """What measuring needs of the model before training (`base`), also when a finished run is measured anew."""

    @property
    def teacher(self):
        """A teacher model whose held-out metrics the run reports next to the student's, or None."""
        return None

    # -- each step
    steps_per_batch: int = 1              # consecutive optimizer steps on one batch of examples (RL: rl.updates)

    def begin_step(self, model, examples: list[int], step: int) -> None:
        """Before a step's passes, with the examples of this process's passes (RL samples its rollouts here)."""

    def step_metrics(self) -> dict:
        """What the step just taken adds to its metrics.jsonl row (RL: rewards, lengths, KL)."""
        return {}

    def resume_state(self) -> dict | None:
        """What a checkpoint must keep of the objective for a resumed run to go on bit for bit (tensors and plain
        containers; called on every process at every checkpoint), or None (the default: nothing is carried between
        steps). RL keeps its rollouts while rl.updates > 1 steps train on them."""
        return None

    def restore_state(self, state: dict) -> None:
        """Take back what `resume_state` returned, on resume."""

    def weight(self, example: Tokenized) -> int:
        """What a step's loss is averaged over: trained tokens (here), or 1 per class label or preference pair."""
        return int((example.labels[1:] != IGNORE).sum())

    def loss(self, model, batch, examples: list[int]) -> torch.Tensor:
        """The summed loss of one forward pass over `batch` (training examples `examples`); the loop normalises."""
        raise NotImplementedError

    # -- measuring
    def measure(self, model, examples: list[Tokenized]) -> dict:
        """Held-out metrics of `model` on `examples` (the `eval_*` keys metrics.jsonl and eval.json carry)."""
        raise NotImplementedError

    def samples(self, model, indices: list[int]) -> list:
        """Outputs on these held-out examples for the side-by-side table (models.generate.Generation each)."""
        sampling = Sampling(max_new_tokens=self.cfg.eval.max_new_tokens, num_beams=self.cfg.eval.num_beams)
        return generate(model, self.tokenizer, [self.data.val.rendered[i].prompt for i in indices], sampling)

    def describe(self, metrics: dict) -> str:
        """One line of held-out metrics (the log's `step N:` lines)."""
        raise NotImplementedError

    def results(self, before: dict, after: dict) -> list[str]:
        """What the finished run says about the held-out split, before -> after."""
        return []

    # -- saving
    def save(self, folder: Path) -> None:
        """Files the saved model needs besides its weights and prompt format (a reward model: where its score is read)."""


def objective_module(task: str):
    """The module of `task`'s objective: `TaskSpec.objective` names one here, or else any module by its full name."""
    name = TASKS[task].objective
    own = f"tunesmith.objectives.{name}"
    return importlib.import_module(own if "." not in name and importlib.util.find_spec(own) else name)


def generates(task: str) -> bool:
    """Whether a run of `task` generates text for its side-by-side table (`Objective.generates`), without building one."""
    return objective_module(task).OBJECTIVE.generates


def objective_for(task: str, cfg, data: PreparedData, tokenizer, dtype: torch.dtype) -> Objective:
    """The objective a run of `task` trains (with `distill.teacher`: distillation around it)."""
    objective = objective_module(task).OBJECTIVE(cfg, data, tokenizer)
    if cfg.distill.teacher:
        from tunesmith.objectives.distill import Distill

        return Distill(objective, dtype)
    return objective


__all__ = ["Context", "Objective", "objective_for"]
