"""Mid-run checkpoints: everything an exact resume needs, written atomically, verified on load.

A checkpoint is `runs/NAME/checkpoints/step-0000040/` with
  trainable.safetensors  the trainable weights (adapter or unfrozen weights)
  state.pt               optimizer state, python/numpy/torch RNG states and what the objective carries between
                         steps (RL's rollouts while rl.updates > 1), as tensors and plain containers only:
                         it loads with torch.load(weights_only=True), so a planted file cannot run code on resume
  progress.json          step, counters, metrics so far, and the fingerprint of data + base model (train/progress.py)
  manifest.json          size and sha256 of the three files above (written last)
The folder is written under a temporary name, fsynced and renamed, so a crash leaves either the
whole checkpoint or none. Resume walks back from the newest checkpoint to the first one whose
manifest checks out, saying which ones it skipped and why.
"""
from __future__ import annotations

import json
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tunesmith.config import OutputConfig
from tunesmith.errors import TunesmithError
from tunesmith.run import RunDir
from tunesmith.run.files import publish_dir, read_jsonl, sha256_of, write_text_atomic
from tunesmith.run.layout import is_tunesmith_run
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


def save(run: RunDir, weights: dict, optimizer_state: dict, progress: Progress, objective_state: dict | None = None) -> Path:
    """`weights`/`optimizer_state`: full tensors (distributed.full_weights / full_optimizer_state); `objective_state`:
    what the objective needs to go on bit for bit (Objective.resume_state: RL's rollouts between updates), or None."""
    run = RunDir(run)
    target = run.checkpoint(progress.step)
    target.parent.mkdir(exist_ok=True)
    _check_space(target.parent, weights, optimizer_state)

    def write(tmp: Path) -> None:
        save_file(weights, tmp / "trainable.safetensors")
        torch.save({"optimizer": optimizer_state, "rng": rng_state(), "objective": objective_state}, tmp / "state.pt")
        (tmp / "progress.json").write_text(json.dumps(progress.to_json(), indent=1))
        manifest = {name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256_of(tmp / name)} for name in FILES}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))

    publish_dir(target, write)
    return target


def rng_state() -> dict:
    """The python, numpy and torch generators' states as plain values and tensors (no numpy objects to unpickle)."""
    version, keys, gauss = random.getstate()
    kind, np_keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": {"version": version, "keys": torch.tensor(keys, dtype=torch.int64), "gauss": gauss},
            "numpy": {"kind": kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(rng: dict) -> None:
    py, npy = rng["python"], rng["numpy"]
    if isinstance(py, dict):
        random.setstate((py["version"], tuple(int(k) for k in py["keys"].tolist()), py["gauss"]))
        np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                             npy["cached_gaussian"]))
    else:  # checkpoints written before state.pt held plain values only
        random.setstate(py)
        np.random.set_state(npy)
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _check_space(folder: Path, weights: dict, optimizer_state: dict) -> None:
    """Refuse before writing when the disk cannot hold the checkpoint (its tensors, and as much again of slack)."""
    def size(obj) -> int:
        if torch.is_tensor(obj):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(size(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(size(v) for v in obj)
        return 0

    need, free = 2 * (size(weights) + size(optimizer_state)), shutil.disk_usage(folder).free
    if need > free:
        raise OSError(28, f"No space left on device: the checkpoint needs ~{need / 2**20:.0f} MiB, {free / 2**20:.0f} MiB free")


def _file_size_limit() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def save_or_warn(run: RunDir, weights: dict, optimizer_state: dict, progress: Progress, keep: int | None, log,
                 objective_state: dict | None = None) -> Path | None:
    """Save; a save that fails for any reason (no space, a file too large, permissions, ...) is reported and training
    goes on, the previous checkpoint intact. Returns the checkpoint written, or None."""
    run = RunDir(run)
    try:
        path = save(run, weights, optimizer_state, progress, objective_state)
    except Exception as e:  # safetensors raises SafetensorError, torch.save RuntimeError: not only OSError
        older = all_checkpoints(run)
        log(f"could not write the checkpoint at step {progress.step}: {_reason(e, run.checkpoints)}; "
            f"{'the previous checkpoint ' + older[-1].name + ' is intact' if older else 'there is no earlier checkpoint'}; "
            f"training continues")
        return None
    removed = prune(run, keep) if keep else []
    log(f"checkpoint: {path}" + (f" (removed {', '.join(removed)})" if removed else ""))
    return path


def _reason(e: Exception, folder: Path | None = None) -> str:
    """Why a save failed, in words: torch.save reports a short write as "unexpected pos ...", so the disk and the
    process's file-size limit are looked at."""
    text = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).splitlines() or [type(e).__name__])[0]
    if "unexpected pos" in text or "PytorchStreamWriter" in text:
        limit = _file_size_limit()
        if limit is not None:
            text = f"File too large (this process may write files of {limit:,} bytes at most)"
        elif folder is not None:
            text = f"a file could not be written in full ({shutil.disk_usage(folder).free / 2**20:.0f} MiB free on its disk)"
    return text


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
        if sha256_of(f) != manifest[name]["sha256"]:
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
        trained = run.summary.exists() and json.loads(run.summary.read_text()).get("state") == "trained"
        if trained:
            raise TunesmithError(f"{run_dir} is trained (final/ exists) but its closing evaluation did not finish: "
                                 f"complete it with tunesmith eval {run_dir}")
        raise TunesmithError(f"{run_dir} already finished (final/ exists); start a new run to train further")
    ckpt = latest_good(run, log)
    if ckpt is None:
        raise TunesmithError(f"{run_dir} has no usable checkpoint to resume from (set train.save_every_steps to write them)")
    saved = ckpt.progress.fingerprint
    changed = [k for k in ("data", "model") if saved.get(k) != fingerprint[k]]
    if "model" in changed and not str(saved.get("model", "")).startswith("v2-") and fingerprint.get("legacy_model") == saved.get("model"):
        changed.remove("model")  # a checkpoint from before the content-checked fingerprint: compared the old way
    if changed and not force:
        what = {"data": "the training data (files, data settings or tokenizer)", "model": "the base model"}
        raise TunesmithError(f"cannot resume {run_dir}: {' and '.join(what[k] for k in changed)} changed since "
                             f"{ckpt.path.name} was written; pass --force-resume to continue anyway")
    if changed:
        log(f"resuming although {', '.join(changed)} changed (--force-resume)")
    return ckpt


def restore(ckpt: Checkpoint, model, optimizer) -> dict | None:
    """Trainable weights, optimizer state and RNG states, as they were when `ckpt` was saved; returns the objective's
    saved state (None when it kept none, and in checkpoints written before it could)."""
    weights = load_file(ckpt.path / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing or any(n not in params for n in weights):
        raise TunesmithError(f"checkpoint {ckpt.path} does not match this model's trainable parameters "
                             f"(e.g. {(missing or [n for n in weights if n not in params])[0]}); was the method changed?")
    state = _load_state(ckpt.path / "state.pt")
    saved_scales = [g.get("lr_scale", 1.0) for g in state["optimizer"]["param_groups"]]
    scales = [g.get("lr_scale", 1.0) for g in optimizer.param_groups]
    if saved_scales != scales:  # load_state_dict would fail on the count, or keep the old rates without a word
        raise TunesmithError(f"checkpoint {ckpt.path} was trained with learning-rate scales {saved_scales} per parameter "
                             f"group, this launch has {scales}; was method.loraplus_lr_ratio changed? Resume with the "
                             f"run's own setting")
    set_weights(model, weights)
    load_optimizer_state(optimizer, state["optimizer"])
    set_rng_state(state["rng"])
    return state.get("objective")


def _load_state(path: Path) -> dict:
    """state.pt without unpickling arbitrary objects: tensors and plain containers (weights_only); the numpy RNG
    state of older checkpoints is an array, allowed by name (numpy's array reconstruction runs no other code)."""
    multiarray = getattr(np, "_core", None) or np.core  # numpy 2 moved it
    legacy = [multiarray.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(legacy):
            return torch.load(path, weights_only=True)
    except Exception as e:  # an object outside the allow-list: refused, not run
        raise TunesmithError(f"{path} holds objects a checkpoint does not (loading it would run code, which resume "
                             f"refuses): {str(e).splitlines()[0]}") from None


def save_best(run: RunDir, weights: dict, record: dict, log) -> bool:
    """`best/`: the trainable weights (full tensors) with the best held-out metric so far (train.select_best). A
    failed save is reported (the previous best/ stays) and training goes on; returns whether it was written."""
    run = RunDir(run)

    def write(tmp: Path) -> None:
        save_file(weights, tmp / "trainable.safetensors")
        (tmp / "metrics.json").write_text(json.dumps(record, indent=1))

    try:
        publish_dir(run.best, write)
    except Exception as e:
        log(f"could not write best/ at step {record['step']}: {_reason(e, run.path)}; the previous best/ (if any) stays; training continues")
        return False
    return True


def best_step(run: RunDir) -> int | None:
    """The step whose weights best/ holds."""
    try:
        return json.loads((RunDir(run).best / "metrics.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None


def load_best(run: RunDir, model) -> None:
    run = RunDir(run)
    set_weights(model, load_file(run.best / "trainable.safetensors"))


def prune(run: RunDir, keep: int) -> list[str]:
    """Delete all but the newest `keep` checkpoints, never the one with the best held-out loss."""
    run = RunDir(run)
    paths = all_checkpoints(run)
    scored = [(loss, p) for p in paths if (loss := _eval_loss(p)) is not None and math.isfinite(loss)]  # NaN is never best
    best = min(scored, default=(None, None))[1]
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


def auto_resume_dir(output: OutputConfig, overwrite: bool) -> tuple[Path | None, bool]:
    """With output.resume=auto: (the named run directory to resume, when it has a checkpoint and no final model yet;
    whether to start it again, when tunesmith made it and it was stopped before its first checkpoint)."""
    if output.resume != "auto" or not output.name or overwrite:
        return None, False
    run = RunDir(Path(output.dir) / output.name)
    if not run.path.is_dir() or run.is_finished():
        return None, False
    if all_checkpoints(run):
        return run.path, False
    return None, is_tunesmith_run(run.path)


def truncate_metrics(run_dir: RunDir, step: int) -> None:
    """On resume: forget rows logged after the checkpoint (those steps run again)."""
    path = run_dir.metrics
    rows = read_jsonl(path)
    if not rows and not path.exists():
        return
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= step))
