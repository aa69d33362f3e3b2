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
      judgements.jsonl             the studio's blind A/B judgements of the run (evaluate/human.py); a child run's data
      report.html (+ training.png, metrics.png, rl.png)
      checkpoints/step-NNNNNNN/    mid-run checkpoints (train/checkpoint.py)
      best/                        train.select_best: the best weights so far
      final/                       the trained model or adapter, loadable with plain transformers / peft
      export/                      `tunesmith export`
      teacher_topk/                distill.top_k: the teacher's cached logits
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from tunesmith.config import check_name, read_yaml
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

    @property
    def judgements(self) -> Path:
        return self.path / "judgements.jsonl"

    def plot(self, name: str) -> Path:
        """The report's PNGs: training.png, metrics.png, rl.png (online RL)."""
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


@dataclass(frozen=True)
class TrainedFrom:
    """A run's lineage, as its config.yaml records it: the run it continued (`model.name` naming a run folder) and the
    judgements it learned from (`data.path` naming a run's judgements file, data/judgements.py)."""
    parent: RunDir | None
    judgements: Path | None


def trained_from(run: RunDir) -> TrainedFrom:
    """The parent run and judgements file of `run`; relative paths in its config.yaml are read from the folder the run
    was started in (the one holding `output.dir`), then from here."""
    run = RunDir(run)
    if not run.is_run():
        return TrainedFrom(None, None)
    cfg = read_yaml(run.config)
    out_dir = Path(str((cfg.get("output") or {}).get("dir") or "runs"))
    above = run.path.resolve().parents  # the run is <started>/<output.dir>/NAME
    relative = not out_dir.is_absolute() and ".." not in out_dir.parts and len(out_dir.parts) < len(above)
    started = above[len(out_dir.parts)] if relative else None

    def found(value) -> Path | None:
        if not isinstance(value, str) or not value or value.startswith(("builtin:", "datasets:")):
            return None
        path = Path(value).expanduser()
        for candidate in ([started / path] if started and not path.is_absolute() else []) + [path]:
            if candidate.exists():
                return candidate
        return None

    model = found((cfg.get("model") or {}).get("name"))
    data = found((cfg.get("data") or {}).get("path"))
    parent = RunDir(model) if model is not None and model.is_dir() and RunDir(model).is_run() else None
    judged = data if data is not None and data.is_file() and (data.name == "judgements.jsonl"
                                                             or data.name.endswith("-judgements.jsonl")) else None
    return TrainedFrom(parent, judged)


RUN_MARKER = ".tunesmith-run"        # written when tunesmith creates a run folder: only such a folder is ever replaced
EXPORT_MARKER = ".tunesmith-export"  # the same for an export folder


def is_tunesmith_run(path: Path) -> bool:
    return (Path(path) / RUN_MARKER).is_file()


def choose_run_dir(parent: str, name: str | None, recipe: str, overwrite: bool) -> RunDir:
    """Pick the run directory and refuse an existing one early (nothing is created or deleted yet). A default name
    (`<recipe>-<date>-<time>`) taken already, by a run started in the same second, gets a suffix (-2, -3, ...)."""
    if name is None:
        base = Path(parent) / f"{check_name(recipe, 'recipe')}-{datetime.now():%Y%m%d-%H%M%S}"
        run, n = RunDir(base), 2
        while run.path.exists():
            run, n = RunDir(f"{base}-{n}"), n + 1
        return run
    run = RunDir(Path(parent) / check_name(name))
    if run.path.exists() and not overwrite:
        raise TunesmithError(f"run directory {run} already exists; choose another output.name, or pass --overwrite to replace it")
    if run.path.exists():
        check_replaceable(run.path)
        from tunesmith.run.lock import holder

        if live := holder(run.path):
            raise TunesmithError(f"{run} is in use: {live}; wait for it to finish, or stop it first (a run has one writer "
                                 f"at a time)")
    return run


def check_replaceable(path: Path) -> None:
    """`--overwrite` replaces only a folder tunesmith made as a run (its marker), never a folder of the user's."""
    if path.is_symlink() or not path.is_dir() or not is_tunesmith_run(path):
        raise TunesmithError(f"{path} exists and is not a run folder tunesmith created (it has no {RUN_MARKER}); "
                             f"--overwrite replaces only those: choose another output.name, or move it away yourself")


def create_run_dir(run: RunDir, overwrite: bool) -> Path | None:
    """Create the run folder once the inputs are known to be good, so a bad config or data file leaves nothing behind.
    With `overwrite` an existing run of that name (which no process is writing) is moved aside to
    `.NAME.replaced-<time>`, and that path returned: the caller deletes it once the new run has finished, so a new
    run that fails leaves the old one recoverable. The folder is made exclusively: a second process that chose the
    same name in the meantime gets an error, not a shared folder."""
    from tunesmith.run.lock import RunLock

    replaced = None
    if run.path.exists():
        if not overwrite:
            raise TunesmithError(f"run directory {run} already exists; choose another output.name, or pass --overwrite to replace it")
        check_replaceable(run.path)
        with RunLock(run.path).acquire("replacing it"):  # refused while a live process writes the old run
            replaced = run.path.with_name(f".{run.name}.replaced-{datetime.now():%Y%m%d-%H%M%S-%f}")
            os.replace(run.path, replaced)
    run.path.parent.mkdir(parents=True, exist_ok=True)
    try:
        run.path.mkdir()
    except FileExistsError:
        raise TunesmithError(f"run directory {run} was created by another process meanwhile; choose another output.name") from None
    (run.path / RUN_MARKER).write_text(json.dumps({"created": datetime.now().isoformat(timespec="seconds"),
                                                   "pid": os.getpid()}) + "\n")
    return replaced
