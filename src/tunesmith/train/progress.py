"""How far a run has come: the counters, evaluations and settings a checkpoint records (its progress.json), written
down once. Version 1 was the same keys without a version; `from_json` reads both."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

VERSION = 2


@dataclass
class Progress:
    step: int = 0                      # optimizer steps done
    examples: int = 0                  # training examples seen (all processes)
    tokens: int = 0                    # real training tokens seen
    train_seconds: float = 0.0         # inside training steps
    first_step_seconds: float = 0.0    # the first step pays for allocation: the time budget's pace leaves it out
    planned_steps: int = 0             # the step count planned (re-planned under train.max_minutes)
    global_batch: int = 0              # examples per step over all processes: a resume must keep it
    evals: list[dict] = field(default_factory=list)          # the held-out evaluations during training
    skipped_steps: list[int] = field(default_factory=list)   # steps whose update was skipped (train.on_nonfinite=skip)
    best: dict | None = None           # train.select_best: {"step", "value"}
    precision: dict = field(default_factory=dict)            # what the run trained in (Precision.settings())
    eval_loss: float | None = None     # the held-out loss at this checkpoint's step, if it had an evaluation
    fingerprint: dict = field(default_factory=dict)          # of the data and the base model
    version: int = VERSION

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, saved: dict) -> "Progress":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in saved.items() if k in known}
        if "precision" not in saved and "dtype" in saved:  # checkpoints before train.mixed_precision recorded the dtype alone
            values["precision"] = {"model.dtype": saved["dtype"]}
        return cls(**values)

    def continued(self, now: "Progress") -> "Progress":
        """This checkpoint's counters with `now`'s settings (precision, planned steps, global batch) for a resumed
        run; the caller decides which planned step count wins."""
        return Progress(**{**asdict(self), "precision": now.precision, "eval_loss": None, "fingerprint": now.fingerprint,
                           "version": VERSION})
