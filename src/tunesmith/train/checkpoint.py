"""Mid-run checkpoints: everything an exact resume needs, written atomically, verified on load.

A checkpoint is `runs/NAME/checkpoints/step-0000040/` with
  trainable.safetensors  the trainable weights (adapter or unfrozen weights)
  state.pt               optimizer state and python/numpy/torch RNG states
  progress.json          step, counters, metrics so far, and the fingerprint of data + base model (train/progress.py)
  manifest.json          size and sha256 of the three files above (written last)
The folder is written under a temporary name, fsynced and renamed, so a crash leaves either the
whole checkpoint or none. Resume walks back from the newest checkpoint to the first one whose
manifest checks out, saying which ones it skipped and why.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tunesmith.errors import TunesmithError
from tunesmith.run import RunDir
from tunesmith.run.files import publish_dir
from tunesmith.train.distributed import load_optimizer_state, set_weights
from tunesmith.train.progress import Progress

FILES = ("trainable.safetensors", "state.pt", "progress.json")


@dataclass
class Checkpoint:
    path: Path
    progress: Progress

    @property
    def step(self) -> int:
        return self.progress.step


def save(run: RunDir, weights: dict, optimizer_state: dict, progress: Progress) -> Path:
    """`weights`/`optimizer_state`: full tensors (distributed.full_weights / full_optimizer_state)."""
    run = RunDir(run)
    target = run.checkpoint(progress.step)
    target.parent.mkdir(exist_ok=True)

    def write(tmp: Path) -> None:
        save_file(weights, tmp / "trainable.safetensors")
        torch.save({"optimizer": optimizer_state,
                    "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}},
                   tmp / "state.pt")
        (tmp / "progress.json").write_text(json.dumps(progress.to_json(), indent=1))
        manifest = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in FILES}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))

    publish_dir(target, write)
    return target


def save_or_warn(run: RunDir, weights: dict, optimizer_state: dict, progress: Progress, keep: int | None, log) -> None:
    """Save; a failed save (disk full, ...) is reported and training goes on, the previous checkpoint intact."""
    run = RunDir(run)
    try:
        path = save(run, weights, optimizer_state, progress)
    except OSError as e:
        older = all_checkpoints(run)
        log(f"could not write the checkpoint at step {progress.step}: {e.strerror or e}; "
            f"{'the previous checkpoint ' + older[-1].name + ' is intact' if older else 'there is no earlier checkpoint'}; "
            f"training continues")
        return
    removed = prune(run, keep) if keep else []
    log(f"checkpoint: {path}" + (f" (removed {', '.join(removed)})" if removed else ""))


def problem(path: Path) -> str | None:
    """Why this checkpoint cannot be used, or None when every file matches its manifest."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return "manifest.json is missing or unreadable"
    for name in FILES:
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != manifest.get(name, {}).get("bytes"):
            return f"{name} has {f.stat().st_size} bytes, the manifest says {manifest.get(name, {}).get('bytes')}"
        if _sha256(f) != manifest[name]["sha256"]:
            return f"{name} does not match its checksum"
    return None


def all_checkpoints(run: RunDir) -> list[Path]:
    run = RunDir(run)
    folder = run.checkpoints
    return sorted(folder.glob("step-*")) if folder.is_dir() else []


def latest_good(run: RunDir, log) -> Checkpoint | None:
    run = RunDir(run)
    for path in reversed(all_checkpoints(run)):
        why = problem(path)
        if why is None:
            return Checkpoint(path, Progress.from_json(json.loads((path / "progress.json").read_text())))
        log(f"checkpoint {path.name} is damaged ({why}); trying the one before it")
    return None


def resume_point(run: RunDir, fingerprint: dict, force: bool, log) -> Checkpoint:
    """The newest good checkpoint of `run`, refused if its data or base model differ from now."""
    run = RunDir(run)
    run_dir = run.path
    if not run.is_run():
        raise TunesmithError(f"{run_dir} is not a tunesmith run directory (no config.yaml)")
    if run.final.exists():
        raise TunesmithError(f"{run_dir} already finished (final/ exists); start a new run to train further")
    ckpt = latest_good(run, log)
    if ckpt is None:
        raise TunesmithError(f"{run_dir} has no usable checkpoint to resume from (set train.save_every_steps to write them)")
    saved = ckpt.progress.fingerprint
    changed = [k for k in ("data", "model") if saved.get(k) != fingerprint[k]]
    if changed and not force:
        what = {"data": "the training data (files, data settings or tokenizer)", "model": "the base model"}
        raise TunesmithError(f"cannot resume {run_dir}: {' and '.join(what[k] for k in changed)} changed since "
                             f"{ckpt.path.name} was written; pass --force-resume to continue anyway")
    if changed:
        log(f"resuming although {', '.join(changed)} changed (--force-resume)")
    return ckpt


def restore(ckpt: Checkpoint, model, optimizer) -> None:
    """Trainable weights, optimizer state and RNG states, as they were when `ckpt` was saved."""
    weights = load_file(ckpt.path / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing or any(n not in params for n in weights):
        raise TunesmithError(f"checkpoint {ckpt.path} does not match this model's trainable parameters "
                             f"(e.g. {(missing or [n for n in weights if n not in params])[0]}); was the method changed?")
    state = torch.load(ckpt.path / "state.pt", weights_only=False)  # our own file, checksum-verified
    saved_scales = [g.get("lr_scale", 1.0) for g in state["optimizer"]["param_groups"]]
    scales = [g.get("lr_scale", 1.0) for g in optimizer.param_groups]
    if saved_scales != scales:  # load_state_dict would fail on the count, or keep the old rates without a word
        raise TunesmithError(f"checkpoint {ckpt.path} was trained with learning-rate scales {saved_scales} per parameter "
                             f"group, this launch has {scales}; was method.loraplus_lr_ratio changed? Resume with the "
                             f"run's own setting")
    set_weights(model, weights)
    load_optimizer_state(optimizer, state["optimizer"])
    rng = state["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_best(run: RunDir, weights: dict, record: dict) -> None:
    """`best/`: the trainable weights (full tensors) with the best held-out metric so far (train.select_best)."""
    run = RunDir(run)

    def write(tmp: Path) -> None:
        save_file(weights, tmp / "trainable.safetensors")
        (tmp / "metrics.json").write_text(json.dumps(record, indent=1))

    publish_dir(run.best, write)


def load_best(run: RunDir, model) -> None:
    run = RunDir(run)
    set_weights(model, load_file(run.best / "trainable.safetensors"))


def prune(run: RunDir, keep: int) -> list[str]:
    """Delete all but the newest `keep` checkpoints, never the one with the best held-out loss."""
    run = RunDir(run)
    paths = all_checkpoints(run)
    best = min(((_eval_loss(p), p) for p in paths if _eval_loss(p) is not None), default=(None, None))[1]
    removed = []
    for p in paths[:-keep] if keep else paths:
        if p != best:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def _eval_loss(path: Path) -> float | None:
    try:
        return json.loads((path / "progress.json").read_text()).get("eval_loss")
    except (OSError, ValueError):
        return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
