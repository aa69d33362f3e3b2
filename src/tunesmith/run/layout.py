"""The run folder's layout, spelled once. Everything that writes or reads a run (training, resume, `eval`, the
report, `export`, `serve`, the studio) names its files through `RunDir`.

    runs/NAME/
      config.yaml                  the resolved config the run trained with
      metrics.jsonl                one line per logged step (and the held-out evaluations)
      train.log                    what the run printed
      baseline.json                held-out metrics and outputs of the base, measured before training
      baseline_general.safetensors the base on general text, for the forgetting check
      eval.json                    the run's results: before/after, side-by-side outputs, forgetting, timings
      evaluation.json, evaluations/  `tunesmith eval`: the latest evaluation, and every one, numbered
      report.html (+ training.png, metrics.png)
      checkpoints/step-NNNNNNN/    mid-run checkpoints (train/checkpoint.py)
      best/                        train.select_best: the best weights so far
      final/                       the trained model or adapter, loadable with plain transformers / peft
      export/                      `tunesmith export`
      teacher_topk/                distill.top_k: the teacher's cached logits
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from tunesmith.errors import TunesmithError


@dataclass(frozen=True)
class RunDir:
    """A run folder; made from a path (or another RunDir), usable where a path is (os.fspath)."""
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def log(self) -> Path:
        return self.path / "train.log"

    @property
    def baseline(self) -> Path:
        return self.path / "baseline.json"

    @property
    def baseline_general(self) -> Path:
        return self.path / "baseline_general.safetensors"

    @property
    def summary(self) -> Path:
        return self.path / "eval.json"

    @property
    def evaluation(self) -> Path:
        return self.path / "evaluation.json"

    @property
    def evaluations(self) -> Path:
        return self.path / "evaluations"

    @property
    def report(self) -> Path:
        return self.path / "report.html"

    def plot(self, name: str) -> Path:
        """The report's PNGs: training.png, metrics.png."""
        return self.path / f"{name}.png"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:07d}"

    @property
    def best(self) -> Path:
        return self.path / "best"

    @property
    def final(self) -> Path:
        return self.path / "final"

    @property
    def exports(self) -> Path:
        return self.path / "export"

    @property
    def teacher_topk(self) -> Path:
        return self.path / "teacher_topk"

    def is_run(self) -> bool:
        """A tunesmith run folder (it has its config)."""
        return self.config.is_file()

    def is_finished(self) -> bool:
        return self.final.is_dir()


def choose_run_dir(parent: str, name: str | None, recipe: str, overwrite: bool) -> RunDir:
    """Pick the run directory and refuse an existing one early (nothing is created or deleted yet)."""
    run = RunDir(Path(parent) / (name or f"{recipe}-{datetime.now():%Y%m%d-%H%M%S}"))
    if run.path.exists() and not overwrite:
        raise TunesmithError(f"run directory {run} already exists; choose another output.name, or pass --overwrite to replace it")
    return run


def create_run_dir(run: RunDir, overwrite: bool) -> RunDir:
    """Create it once the inputs are known to be good, so a bad config or data file leaves nothing behind."""
    import shutil

    if run.path.exists():
        if not overwrite:
            raise TunesmithError(f"run directory {run} already exists; choose another output.name, or pass --overwrite to replace it")
        shutil.rmtree(run.path)
    run.path.mkdir(parents=True)
    return run
