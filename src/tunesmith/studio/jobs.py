"""Fine-tuning jobs: an OpenAI job request becomes one `tunesmith train` command, run as a subprocess of its own.

A subprocess, so that a job that fails (a bad file, out of memory, a crash in a kernel) never takes the server down, and
so that a stop is the CLI's own: SIGTERM finishes the step, writes a checkpoint and exits 130 (train/interrupt.py).
The command is the same for a first start and every later one (`output.resume=auto`): a paused, stopped or
interrupted job continues from its newest checkpoint. The job's run folder, `HOME/runs/<job id>`, is an ordinary run
(`tunesmith eval`, `export`, `serve` take it); its metrics.jsonl and train.log are read as they grow and become the
job's events.

One scheduler thread does all of it, polling twice a second: validate new jobs, start queued ones while fewer than
`workers` run, read the running ones' files, and settle the ones whose process ended. Polling, because a run's
files are the truth and a subprocess's pipes are not (a restarted server has no pipes to the job it resumes).

Where the command runs is the executor's business (the one seam: launch, ended, stop, kill, find again after a
restart). `LocalExecutor` (the default) runs it as a subprocess here; `ray_executor.RayExecutor` submits it to a Ray
cluster as a Ray job (docs/scaling.md). Everything else -- events, metrics, checkpoints, the job's result -- is read
from the run folder either way, so a client cannot tell them apart.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import yaml

from tunesmith.catalog import METHODS, SFT_FORMATS
from tunesmith.config import list_recipes, load_config
from tunesmith.errors import TunesmithError
from tunesmith.models.load import BUNDLED
from tunesmith.paths import child_env
from tunesmith.run import RunDir
from tunesmith.run.lock import holder
from tunesmith.studio.follow import new_lines
from tunesmith.studio.protocol import event_name, metrics_event
from tunesmith.studio.store import TERMINAL, Store

DEFAULT_CONFIG = Path(__file__).with_name("default.yaml")
STUDIO_OWNS = ("output.dir", "output.name", "output.resume", "output")
STOP_WAIT_SECONDS = 120  # a stopping job finishes its step and writes a checkpoint in this time, or is killed
MAX_JOB_ERRORS = 5       # one job's step failing this many times in a row fails that job (and nothing else)
# what an online-RL step adds to its metrics event (objectives/rl.py): the live page charts the reward


# What `tunesmith.overrides` may set over HTTP: `task`, `model.dtype` and the keys of these sections, except the ones
# that name a file or a model on the server (NOT_OVER_HTTP). Rewards and teachers are checked on the resolved config.
OVERRIDE_KEYS = ("task", "model.dtype")
OVERRIDE_SECTIONS = ("data", "method", "train", "eval", "dpo", "reward", "rl", "distill")
NOT_OVER_HTTP = {
    "model.name": "the model is the job's `model` field",
    "data.path": "data comes from uploaded files (training_file, validation_file)",
    "data.val_path": "data comes from uploaded files (training_file, validation_file)",
    "train.deepspeed_config": "it names a file on the server",
}
DATA_KEYS = ("data.path", "data.val_path")


@dataclass(frozen=True)
class Policy:
    """What the studio's operator let HTTP requests reach, when starting it (`tunesmith studio` flags)."""
    allow_code: bool = False                 # --allow-code: any config key, function rewards, teachers, hub ids
    models_dirs: tuple[Path, ...] = ()       # --models DIR: models under these folders may be named
    data_roots: tuple[Path, ...] = ()        # --data-root DIR: data.path / data.val_path under these folders
    home: Optional[Path] = None              # the studio's home: its finished runs may be RL rewards (reward_run)

    def roots(self) -> dict[str, Path]:
        """The operator's folders by the names messages give them (never their server paths)."""
        out = {f"<models {i + 1}>" if len(self.models_dirs) > 1 else "<models>": Path(d)
               for i, d in enumerate(self.models_dirs)}
        out.update({f"<data root {i + 1}>" if len(self.data_roots) > 1 else "<data root>": Path(d)
                    for i, d in enumerate(self.data_roots)})
        return out


def public_text(text: str, home: Path, policy: Policy = Policy()) -> str:
    """A message for a client: the studio home and the operator's folders by a name, never as server paths."""
    folders = {"<studio home>": Path(home), **policy.roots()}
    for label, folder in sorted(folders.items(), key=lambda kv: -len(str(kv[1]))):
        text = text.replace(str(folder), label)
    return text


def under(path: Path, roots) -> Optional[Path]:
    """The root that holds `path` (symbolic links followed), or None."""
    real = os.path.realpath(path)
    for root in roots:
        r = os.path.realpath(root)
        if real == r or real.startswith(r.rstrip(os.sep) + os.sep):
            return Path(root)
    return None


def model_in_folders(name: str, roots) -> Optional[tuple[Path, str]]:
    """(the model's folder or .gguf file, its id: the path inside its --models folder) for a model named by that id or
    by its absolute path under one of the folders; None for anything else (nothing is looked at outside them)."""
    if not roots or not name or "\\" in name or any(p == ".." for p in Path(name).parts):
        return None
    p = Path(name)
    candidates = [p] if p.is_absolute() else [Path(r) / p for r in roots]
    for c in candidates:
        root = under(c, roots)
        if root is None or os.path.realpath(c) == os.path.realpath(root):
            continue
        if (c.is_dir() and (c / "config.json").is_file()) or (c.is_file() and c.suffix == ".gguf"):
            return c, Path(os.path.relpath(c, root)).as_posix()
    return None


def check_overrides(user: list[str], policy: Policy) -> list[str]:
    """The job's key=value overrides as they may run, or JobError naming the first key HTTP may not set."""
    out = []
    for item in user:
        key, _, value = item.partition("=")
        key = key.strip()
        if key in STUDIO_OWNS or key.startswith("output."):
            raise JobError(f"tunesmith.overrides: {key} is set by the studio (each job's run is HOME/runs/<job id>)",
                           "tunesmith.overrides")
        parts = key.split(".")
        head = ".".join(parts[:2])
        if policy.allow_code:
            out.append(item)
            continue
        if head in DATA_KEYS and policy.data_roots:
            out.append(f"{key}={json.dumps(_data_value(key, value, policy.data_roots))}")
            continue
        if head in NOT_OVER_HTTP:
            raise JobError(f"tunesmith.overrides: {key} cannot be set over HTTP: {NOT_OVER_HTTP[head]}"
                           + (" (or a --data-root folder the studio's operator lists)" if head in DATA_KEYS else ""),
                           "tunesmith.overrides", "override_not_allowed")
        if key not in OVERRIDE_KEYS and not (len(parts) >= 2 and parts[0] in OVERRIDE_SECTIONS):
            raise JobError(f"tunesmith.overrides: {key} cannot be set over HTTP; allowed: {', '.join(OVERRIDE_KEYS)} and "
                           f"the keys of {', '.join(OVERRIDE_SECTIONS)} (not {', '.join(NOT_OVER_HTTP)})",
                           "tunesmith.overrides", "override_not_allowed")
        out.append(item)
    return out


def _data_value(key: str, value: str, roots) -> object:
    """data.path / data.val_path under the operator's --data-root folders: absolute, every match inside them."""
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    items = parsed if isinstance(parsed, list) else [parsed]
    out = []
    for item in items:
        if item is None:
            out.append(None)
            continue
        text = str(item)
        p = Path(text)
        if any(part == ".." for part in p.parts):
            raise JobError(f"tunesmith.overrides: {key}: '..' is not allowed", "tunesmith.overrides", "override_not_allowed")
        full = p if p.is_absolute() else Path(roots[0]) / p
        root = under(Path(os.path.normpath(full)).parent if glob.has_magic(text) else full, roots)
        if root is None or any(under(Path(m), roots) is None for m in glob.glob(str(full))):
            raise JobError(f"tunesmith.overrides: {key}: only files under the studio's --data-root folders may be "
                           f"named", "tunesmith.overrides", "override_not_allowed")
        out.append(os.path.normpath(full))
    return out if isinstance(parsed, list) else out[0]


def reward_run(name: Optional[str], policy: Policy) -> Optional[Path]:
    """The studio's own finished run named `runs/NAME` (a reward model trained by a job: jobs run in the studio home,
    so that path resolves there), or None for anything else."""
    p = Path(name or "")
    if policy.home is None or p.is_absolute() or len(p.parts) != 2 or p.parts[0] != "runs" or p.parts[1] in (".", ".."):
        return None
    runs = Path(policy.home) / "runs"
    run = runs / p.parts[1]
    return run if (run / "final").is_dir() and under(run, [runs]) else None


def check_resolved(cfg, policy: Policy) -> None:
    """What a config may reach once resolved (a recipe and overrides together): no code and no model outside the
    operator's folders unless --allow-code."""
    if policy.allow_code:
        return
    for k, reward in enumerate(cfg.rl.rewards):
        if reward.kind == "function":
            raise JobError(f"tunesmith.overrides: rl.rewards[{k}] (kind: function) runs code on the server; the studio "
                           f"runs it only when started with --allow-code", "tunesmith.overrides", "override_not_allowed")
        if reward.kind == "model" and model_in_folders(reward.path, policy.models_dirs) is None \
                and reward_run(reward.path, policy) is None:
            raise JobError(f"tunesmith.overrides: rl.rewards[{k}] (kind: model): a reward model must be under the "
                           f"studio's --models folders or be one of its finished runs (runs/NAME)", "tunesmith.overrides",
                           "override_not_allowed")
    teacher = cfg.distill.teacher
    if teacher and teacher not in BUNDLED and model_in_folders(teacher, policy.models_dirs) is None:
        raise JobError("tunesmith.overrides: distill.teacher must be a bundled model or one under the studio's --models "
                       "folders (or the studio started with --allow-code)", "tunesmith.overrides", "override_not_allowed")


def found_models(cfg, policy: Policy) -> list[str]:
    """Overrides naming the reward models and the teacher a config gives by their id in a --models folder by the
    absolute path found there: a job runs in the studio home, where `rm` would be HOME/rm."""
    out = []
    rewards = [r.model_dump() for r in cfg.rl.rewards]
    for reward in rewards:
        if reward["kind"] == "model" and not Path(reward["path"] or "").is_absolute() \
                and (found := model_in_folders(reward["path"], policy.models_dirs)) is not None:
            reward["path"] = str(Path(found[0]).absolute())
    if rewards != [r.model_dump() for r in cfg.rl.rewards]:
        out.append(f"rl.rewards={json.dumps(rewards)}")
    teacher = cfg.distill.teacher
    if teacher and teacher not in BUNDLED and not Path(teacher).is_absolute() \
            and (found := model_in_folders(teacher, policy.models_dirs)) is not None:
        out.append(f"distill.teacher={json.dumps(str(Path(found[0]).absolute()))}")
    return out


class JobError(Exception):
    """A request that cannot become a job: OpenAI's 400 with the field it is about."""

    def __init__(self, message: str, param: Optional[str] = None, code: str = "invalid_request_error", status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


@dataclass
class Plan:
    """What a job request resolves to: the config source and the overrides of its `tunesmith train` command."""
    source: str
    overrides: list[str]
    hyperparameters: dict
    base: str                 # the base model's label in fine_tuned_model ids
    task: str                 # as the config resolves it (auto: decided by the data)
    recipe: str               # the recipe's name, or "studio" (default.yaml)
    resources: dict = field(default_factory=dict)  # tunesmith.resources: what the job asks of a cluster (Ray)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def plan_job(req: dict, model_name: str, base: str, train_path: Path, val_path: Optional[Path],
             policy: Policy = Policy()) -> Plan:
    """The `tunesmith train` command of a job request (OpenAI's fields plus the `tunesmith` extension). Raises
    JobError naming the field when the request cannot run (the config is loaded, so a bad key fails here)."""
    method = req.get("method") or {"type": "supervised"}
    kind = method.get("type", "supervised")
    if kind not in ("supervised", "dpo"):
        raise JobError(f"method.type {kind!r} is not served; supported: supervised, dpo", "method.type")
    hp = dict(req.get("hyperparameters") or {})
    hp.update((method.get(kind) or {}).get("hyperparameters") or {})
    ext = req.get("tunesmith") or {}
    recipe = ext.get("recipe")
    user = check_overrides(list(ext.get("overrides") or []), policy)
    if recipe is not None and recipe not in list_recipes():
        raise JobError(f"tunesmith.recipe: no recipe {recipe!r}; available: {', '.join(list_recipes())}", "tunesmith.recipe")
    source = recipe or str(DEFAULT_CONFIG)
    over = [f"model.name={model_name}", f"data.path={train_path}",
            f"data.val_path={val_path}" if val_path else "data.val_path=null"]
    if kind == "dpo":
        over.append("task=dpo")
    if req.get("seed") is not None:
        over += [f"train.seed={req['seed']}", f"data.seed={req['seed']}"]
    try:
        cfg = load_config(source, over + user)
        resolved = _hyperparameters(hp, cfg, kind)
        cfg = load_config(source, over + resolved["overrides"] + user)  # the user's key=value wins
    except TunesmithError as e:
        raise JobError(str(e), "tunesmith.overrides" if user else "hyperparameters") from None
    check_resolved(cfg, policy)
    return Plan(source, over + resolved["overrides"] + user + found_models(cfg, policy), resolved["values"], base,
                cfg.task, recipe or "studio", check_resources(ext.get("resources")))


# what tunesmith.resources may ask, each a number >= this: per process, and how many nodes x processes per node
RESOURCES = {"cpus": 0.0, "gpus": 0.0, "memory_gb": 0.0, "nodes": 1, "processes": 1}


def check_resources(asked) -> dict:
    """`tunesmith.resources` ({"cpus": 2, "gpus": 1, "memory_gb": 16, "nodes": 2, "processes": 4}): what each of the
    job's processes needs of a Ray cluster (the studio's --ray-cpus/--ray-gpus/--ray-memory-gb where absent), and on
    how many nodes x processes per node it trains (torchrun; default 1 x 1); a local studio does not use it."""
    if asked is None:
        return {}
    if not isinstance(asked, dict):
        raise JobError("tunesmith.resources: expected an object like {\"cpus\": 2, \"gpus\": 1, \"memory_gb\": 16}",
                       "tunesmith.resources")
    out = {}
    for key, value in asked.items():
        if key not in RESOURCES:
            raise JobError(f"tunesmith.resources.{key}: unknown; known: {', '.join(RESOURCES)}", "tunesmith.resources")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < RESOURCES[key] or value > 1e6 \
                or (isinstance(RESOURCES[key], int) and value != int(value)):
            kind = "a whole number >= 1" if isinstance(RESOURCES[key], int) else "a number >= 0"
            raise JobError(f"tunesmith.resources.{key}: expected {kind}, got {value!r}", "tunesmith.resources")
        out[key] = value
    if out.get("cpus") == 0 and out.get("gpus", 0) == 0:
        raise JobError("tunesmith.resources: a job needs at least some CPUs or GPUs", "tunesmith.resources")
    return out


def _hyperparameters(hp: dict, cfg, kind: str) -> dict:
    """OpenAI's hyperparameters as tunesmith keys; "auto" (or absent) keeps the recipe's value."""
    known = {"n_epochs", "batch_size", "learning_rate_multiplier"} | ({"beta"} if kind == "dpo" else set())
    unknown = sorted(set(hp) - known)
    if unknown:
        raise TunesmithError(f"hyperparameters.{unknown[0]}: not a {kind} hyperparameter; known: {', '.join(sorted(known))}")
    over, values = [], {}

    def number(key, cast, low):
        v = hp.get(key, "auto")
        if v == "auto" or v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < low or (cast is int and v != int(v)):
            raise TunesmithError(f"hyperparameters.{key}: expected \"auto\" or a number >= {low}, got {v!r}")
        return cast(v)

    if (n := number("n_epochs", int, 1)) is not None:
        over += [f"train.epochs={n}", "train.max_steps=null", "train.max_minutes=null"]
    values["n_epochs"] = n if n is not None else cfg.train.epochs
    if (b := number("batch_size", int, 1)) is not None:
        micro = max(d for d in range(1, min(b, cfg.train.micro_batch_size) + 1) if b % d == 0)
        over += [f"train.micro_batch_size={micro}", f"train.grad_accum={b // micro}"]
    values["batch_size"] = b if b is not None else cfg.train.micro_batch_size * cfg.train.grad_accum
    base_lr = cfg.train.lr or METHODS[cfg.method.name].default_lr
    if (m := number("learning_rate_multiplier", float, 1e-6)) is not None:
        over.append(f"train.lr={base_lr * m:g}")
    values["learning_rate_multiplier"] = m if m is not None else 1.0
    if kind == "dpo":
        if (beta := number("beta", float, 1e-6)) is not None:
            over.append(f"dpo.beta={beta:g}")
        values["beta"] = beta if beta is not None else (cfg.dpo.beta or 0.1)
    return {"overrides": over, "values": values}


def check_file_fits(fmt: str, kind: str, task: str, param: str) -> Optional[str]:
    """Why a file's records do not suit the job's method (None when they do)."""
    if kind == "dpo" and fmt != "preference":
        return f"{param}: method dpo needs preference pairs (OpenAI DPO JSONL: input, preferred_output, non_preferred_output); this file is in {fmt} format"
    if kind == "supervised" and fmt == "preference" and task not in ("dpo", "reward", "rl"):  # rl: the pairs' prompts
        return f"{param}: the file holds preference pairs; use method dpo (or a recipe whose task is dpo)"
    if kind == "supervised" and task == "causal" and fmt not in SFT_FORMATS:
        return f"{param}: a supervised causal job needs conversations or prompt/completion records; this file is in {fmt} format"
    return None


# ---------------------------------------------------------------- running

@dataclass
class Running:
    job_id: str
    handle: object                   # the executor's handle of the job's command (a Popen, a Ray job)
    stop: Optional[str] = None       # "cancel", "pause" or "shutdown" once asked
    stop_sent: float = 0.0

    @property
    def proc(self):  # the local executor's handle: its subprocess
        return self.handle


@dataclass(frozen=True)
class Ended:
    """How a job's command ended: its exit code (None when it is not known: the executor lost it), and the reason when
    the executor knows better than the job's log (a node that died)."""
    code: Optional[int]
    error: Optional[str] = None


class LocalExecutor:
    """Each job's command a subprocess of the studio, on this machine (the default executor). Its jobs die with the
    studio (parent-death signal), so a restarted studio finds none of them again: it launches them anew, from their
    newest checkpoint."""
    name = "local"
    detach_on_shutdown = False  # a stopping studio stops its jobs (each writes a checkpoint)

    def attach(self, home: Path) -> None:
        self.home = Path(home)

    def launch(self, job_id: str, args: list[str], env: dict, resources: dict) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "tunesmith.cli.main", *args]
        out = open(self.home / "jobs" / f"{job_id}.log", "ab")
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.home,
                                env={**child_env(), **env}, start_new_session=True, preexec_fn=_die_with_parent)
        out.close()
        return proc

    def ended(self, proc: subprocess.Popen) -> Optional[Ended]:
        code = proc.poll()
        return None if code is None else Ended(code)

    def news(self, proc: subprocess.Popen) -> list[str]:
        return []

    def stop(self, proc: subprocess.Popen) -> None:
        _signal(proc, signal.SIGTERM)

    def kill(self, proc: subprocess.Popen) -> None:
        proc.kill()

    def wait(self, proc: subprocess.Popen, timeout: float) -> None:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def find(self, job_id: str) -> None:
        return None


class Runner:
    def __init__(self, store: Store, home: Path, workers: int = 1, results: Callable[[dict], dict] = lambda job: {},
                 public: Callable[[str], str] = lambda text: text, allow_code: bool = False, executor=None):
        self.store, self.home, self.workers = store, Path(home), max(1, workers)
        self.public = public          # a message as a client may see it (no server paths)
        self.allow_code = allow_code  # without it, jobs run offline (no hub download a request could ask for)
        self.executor = executor or LocalExecutor()  # where a job's command runs (LocalExecutor, RayExecutor)
        self.running: dict[str, Running] = {}
        self.read: dict[str, dict] = {}  # job id -> how far its files are read (follow.new_lines), as committed
        self.errors: dict[str, int] = {}  # job id -> its steps that raised in a row
        self.last_error: Optional[str] = None
        self.results = results  # a succeeded job's fields (its model id, result files), written with its status
        self.lock = threading.RLock()
        self.stopping = threading.Event()  # no new work: the studio is shutting down
        self.done = threading.Event()      # the scheduler thread may end
        self.thread: Optional[threading.Thread] = None
        (self.home / "jobs").mkdir(parents=True, exist_ok=True)
        self.executor.attach(self.home)

    def run_dir(self, job_id: str) -> RunDir:
        return RunDir(self.home / "runs" / job_id)

    def start(self) -> None:
        for job in self.store.jobs(limit=1_000_000, statuses=("running", "cancelled")):
            if job["stop"] == "pause" and job["status"] == "running":  # it was pausing when the server stopped
                self._end(job["id"], "paused", message="Fine-tuning job paused")
            elif job["stop"]:
                self.store.update_job(job["id"], stop=None)  # no process of it is left to wait for
            elif job["status"] == "running" and not self.executor.detach_on_shutdown:  # it continues first
                self.store.add_event(job["id"], "The studio restarted; the job continues from its newest checkpoint")
        self.thread = threading.Thread(target=self._loop, name="studio-jobs", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        # This thread starts the jobs' processes, and Linux's parent-death signal follows the thread that forked: it
        # lives until shutdown has stopped them (else their SIGTERM would come twice, and the second stops at once).
        while not self.done.is_set():
            if not self.stopping.is_set():
                try:
                    self.tick()
                except Exception as e:  # the scheduler must outlive anything (each job's trouble is its own: _guarded)
                    self.last_error = f"{type(e).__name__}"
                    print(f"studio: scheduler error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            self.done.wait(0.5)

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def tick(self) -> None:
        with self.lock:
            for job in self.store.oldest("validating_files"):
                self._guarded(job["id"], self._validate, job)
            for job_id in list(self.running):
                self._guarded(job_id, self._follow, job_id)
            orphans = [j for j in self.store.oldest("running") if j["id"] not in self.running]
            for job in orphans + self.store.oldest("queued"):
                if len(self.running) >= self.workers:
                    break
                self._guarded(job["id"], self._launch, job)

    def _guarded(self, job_id: str, step, *args) -> None:
        """One job's step; an exception stays that job's: after MAX_JOB_ERRORS in a row the job is failed (its
        process stopped, its checkpoints kept: it can be resumed) and the scheduler goes on with the others."""
        try:
            step(*args)
            self.errors.pop(job_id, None)
        except Exception as e:
            n = self.errors[job_id] = self.errors.get(job_id, 0) + 1
            self.last_error = f"{type(e).__name__} in job {job_id}"
            print(f"studio: job {job_id}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            if n < MAX_JOB_ERRORS:
                return
            self.errors.pop(job_id, None)
            r = self.running.pop(job_id, None)
            if r is not None and self.executor.ended(r.handle) is None:
                self.executor.stop(r.handle)
            try:
                self.store.update_job(job_id, status="failed", stop=None, finished_at=int(time.time()),
                                      error=json.dumps({"code": "studio_error", "param": None, "message":
                                                        f"the studio could not follow this job ({type(e).__name__}); "
                                                        f"resume it to continue from its newest checkpoint"}))
                self.store.add_event(job_id, f"The studio could not follow this job ({type(e).__name__})", level="error")
            except Exception:
                pass

    # ---- states
    def _validate(self, job: dict) -> None:
        req = json.loads(job["request"])
        kind = (req.get("method") or {}).get("type", "supervised")
        for param in ("training_file", "validation_file"):
            if not req.get(param):
                continue
            f = self.store.file(req[param])
            problem = None if f is None or f["status"] == "processed" else f"{param}: {f['status_details']}"
            if f is None:
                problem = f"{param}: file {req[param]} no longer exists"
            problem = problem or check_file_fits(f["format"], kind, req["_plan"]["task"], param)
            if problem:
                self._end(job["id"], "failed", error={"code": f"invalid_{param}", "message": problem, "param": param})
                return
        self.store.update_job(job["id"], status="queued")
        self.store.add_event(job["id"], "Files validated; the job is queued")

    def _launch(self, job: dict) -> None:
        run = self.run_dir(job["id"])
        if job["status"] == "running" and (found := self.executor.find(job["id"])) is not None:
            # it ran on while the studio was down (a Ray job): follow it again; _follow settles it if it has ended
            self.running[job["id"]] = Running(job["id"], found)
            self.store.add_event(job["id"], "The studio restarted; it follows the job again")
            return
        if run.path.exists() and holder(run.path):  # a process of the last server still writes its checkpoint
            return
        if run.is_finished():  # it finished while the server was down, or was paused in its closing evaluation
            self._settle(job["id"], 0, None)
            return
        plan = json.loads(job["request"])["_plan"]
        args = ["train", plan["source"], *plan["overrides"],
                f"output.dir={run.path.parent}", f"output.name={run.name}", "output.resume=auto"]
        env = {"PYTHONUNBUFFERED": "1", "PYTHONSAFEPATH": "1"}  # PYTHONSAFEPATH: nothing is imported from HOME
        if not self.allow_code:
            env["HF_HUB_OFFLINE"] = "1"
        handle = self.executor.launch(job["id"], args, env, plan.get("resources") or {})
        self.running[job["id"]] = Running(job["id"], handle)
        resumed = run.path.exists() and (job["status"] == "running" or _last_step(run) is not None)
        self.store.update_job(job["id"], status="running")
        self.store.add_event(job["id"], "Fine-tuning job resumed from its newest checkpoint" if resumed
                             else "Fine-tuning job started")

    def _follow(self, job_id: str) -> None:
        r = self.running[job_id]
        self._read_files(job_id)
        ended = self.executor.ended(r.handle)
        for message in self.executor.news(r.handle):  # what the executor has to say (a Ray job's node)
            self.store.add_event(job_id, self.public(message))
        if ended is None:
            if r.stop and time.time() - r.stop_sent > STOP_WAIT_SECONDS:
                self.executor.kill(r.handle)
            return
        self._read_files(job_id)
        del self.running[job_id]
        self._settle(job_id, ended.code, r.stop, ended.error)

    def _read_files(self, job_id: str) -> None:
        """New lines of the run's train.log and metrics.jsonl become events. Each file is followed by its identity and
        the bytes read (follow.new_lines), not by a count of lines: a resume rewrites metrics.jsonl to its checkpoint's
        step (train/checkpoint.truncate_metrics, a new file) and trains the later steps again, and the new file may be
        as long as the old one by the next poll; its rows that are the old file's, byte for byte, were read, the rest
        are events (a step trained again is an event again, once). How far each file was read is committed with its
        events in one transaction, so a restarted studio goes on from there."""
        run = self.run_dir(job_id)
        seen = self.read.get(job_id) or self.store.offsets(job_id) or {}
        new, tokens = [], None
        for kind, path in (("log", run.log), ("metrics", run.metrics)):
            lines, seen = new_lines(path, seen, kind, rows=kind == "metrics")
            for line in lines:
                if kind == "log":  # the run's folder as the studio home's runs/NAME, not as a path on the server
                    new.append((self.public(line.replace(str(run.path), f"runs/{run.name}")), "info", "message", None))
                elif (event := _metrics_event(line)) is not None:
                    new.append(event)
                    if event[3].get("tokens") is not None and "train_loss" in event[3]:
                        tokens = int(event[3]["tokens"])
        if not new and self.read.get(job_id) == seen:
            return
        with self.store.transaction():
            for message, level, type_, data in new:
                self.store.add_event(job_id, message, level=level, type=type_, data=data)
            fields = {"offsets": json.dumps(seen)}
            if tokens is not None:
                fields["trained_tokens"] = tokens
            self.store.update_job(job_id, **fields)
        self.read[job_id] = seen

    def _settle(self, job_id: str, code: Optional[int], stop: Optional[str], error: Optional[str] = None) -> None:
        run = self.run_dir(job_id)
        if stop == "shutdown":
            self.store.add_event(job_id, "The studio stopped; the job continues when it starts again")
            return
        if stop in ("cancel", "pause"):
            step = _last_step(run)
            where = f" (checkpoint at step {step})" if step else ""
            self._end(job_id, "cancelled" if stop == "cancel" else "paused",
                      message=("Fine-tuning job cancelled" if stop == "cancel" else "Fine-tuning job paused") + where)
            return
        if code == 0 and run.is_finished():
            self._end(job_id, "succeeded", message="The job has successfully completed")
            return
        message = error or _failure(self.home / "jobs" / f"{job_id}.log", code)
        self._end(job_id, "failed", error={"code": "training_failed", "param": None, "message": self.public(message)})

    def _end(self, job_id: str, status: str, message: Optional[str] = None, error: Optional[dict] = None) -> None:
        fields = {"status": status, "stop": None}
        if status in TERMINAL:
            fields["finished_at"] = int(time.time())
        if error:
            fields["error"] = json.dumps(error)
        with self.store.transaction():  # the status, its result and its events: all or none
            if status == "succeeded":
                fields["error"] = None
                fields.update(self.results(self.store.job(job_id)))
            self.store.update_job(job_id, **fields)
            self.store.add_event(job_id, message or error["message"], level="error" if error else "info")
            if fields.get("fine_tuned_model"):
                self.store.add_event(job_id, f"New fine-tuned model created: {fields['fine_tuned_model']}")

    # ---- requests
    def stop(self, job_id: str, how: str) -> None:
        """Cancel or pause: a queued job ends at once; a running one finishes its step and writes a checkpoint."""
        with self.lock:
            job = self.store.job(job_id)
            r = self.running.get(job_id)
            if r is None:  # queued, validating, or running on a restarted server that has not launched it yet
                if how == "cancel" or job["status"] in ("queued", "running"):
                    self._end(job_id, "cancelled" if how == "cancel" else "paused",
                              message="Fine-tuning job cancelled" if how == "cancel" else "Fine-tuning job paused")
                return
            if r.stop is None:
                r.stop, r.stop_sent = how, time.time()
                self.store.update_job(job_id, stop=how)
                self.store.add_event(job_id, "Stopping after this step; writing a checkpoint")
                self.executor.stop(r.handle)
            if how == "cancel":
                self.store.update_job(job_id, status="cancelled", finished_at=int(time.time()))

    def resume(self, job_id: str) -> None:
        with self.lock:
            with self.store.transaction():  # its files are checked again: they must still be there
                self.store.update_job(job_id, status="validating_files", finished_at=None, error=None)
                self.store.add_event(job_id, "Fine-tuning job resumed; validating its files")

    def shutdown(self, wait: float = STOP_WAIT_SECONDS) -> None:
        """Stop the scheduler; running jobs checkpoint and stay `running`, to continue when the studio starts again (or,
        where the executor runs them apart from the studio, a Ray cluster, go on and are followed again then)."""
        self.stopping.set()
        with self.lock:
            detach = self.executor.detach_on_shutdown
            for r in self.running.values():
                r.stop = "shutdown"
                if not detach:
                    self.executor.stop(r.handle)
            deadline = time.time() + wait
            for job_id, r in list(self.running.items()):
                if not detach:
                    self.executor.wait(r.handle, max(0.1, deadline - time.time()))
                try:  # shutdown completes whatever one job's files hold
                    self._read_files(job_id)
                    if detach:
                        self.store.add_event(job_id, "The studio stopped; the job runs on and is followed again when "
                                                     "the studio starts")
                        continue
                    self._settle(job_id, None, "shutdown")
                except Exception as e:
                    print(f"studio: job {job_id}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            self.running.clear()
        self.done.set()
        if self.thread:
            self.thread.join(timeout=10)


def metrics_csv(run: RunDir) -> bytes:
    """OpenAI's result file: one row per logged step (step, train_loss, valid_loss, ...), from metrics.jsonl."""
    out = io.StringIO()
    w = csv.writer(out)
    keys = ("loss", "eval_loss", "lr", "tokens", "tok_s", "elapsed")
    w.writerow(["step", *(event_name(k) for k in keys)])  # train_loss, valid_loss, learning_rate, ...
    for line in _lines(run.metrics):
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a torn line
        if isinstance(row, dict) and ("loss" in row or "eval_loss" in row):
            w.writerow([row.get("step"), *(row.get(k, "") for k in keys)])
    return out.getvalue().encode()


def checkpoints(run: RunDir) -> list[dict]:
    """The run's checkpoints (resume points), newest first, each with the metrics logged at its step."""
    rows = {}
    for line in _lines(run.metrics):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        rows.setdefault(row.get("step"), {}).update(row)
    found = []
    for path in sorted(run.checkpoints.glob("step-*"), reverse=True) if run.checkpoints.is_dir() else []:
        if not (path / "trainable.safetensors").exists():
            continue
        step = int(path.name.split("-")[1])
        m = rows.get(step, {})
        found.append({"step": step, "created_at": int(path.stat().st_mtime),
                      "metrics": {"step": step, **{event_name(k): m[k] for k in ("loss", "eval_loss") if m.get(k) is not None}}})
    return found


def _metrics_event(line: str) -> Optional[tuple]:
    """(message, level, type, data) of a metrics.jsonl line, or None for a line that is not a step's metrics."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    if not isinstance(row, dict):
        return None
    data = metrics_event(row)  # OpenAI's names (protocol.py: the one mapping), eval_* and online RL's health keys
    try:
        if "train_loss" in data:
            message = f"Step {data['step']}/{data.get('total_steps', '?')}: training loss={float(data['train_loss']):.4f}"
        elif "valid_loss" in data:
            message = f"Step {data['step']}: held-out loss={float(data['valid_loss']):.4f}"
        else:
            return None
    except (TypeError, ValueError):
        return None
    return message, "info", "metrics", data


def _lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    lines = text.split("\n")
    return [ln for ln in lines[:-1] if ln.strip()]  # the last piece has no newline yet: not a whole line


def resumable(job: dict, run: RunDir) -> bool:
    """A job that `resume` continues: paused, cancelled, or failed with a checkpoint to continue from (a full disk, a
    killed process, a studio that could not follow it)."""
    return job["status"] in ("paused", "cancelled") or (job["status"] == "failed" and _last_step(run) is not None)


def _last_step(run: RunDir) -> Optional[int]:
    steps = [int(p.name.split("-")[1]) for p in run.checkpoints.glob("step-*")] if run.checkpoints.is_dir() else []
    return max(steps) if steps else None


def _failure(log: Path, code: int) -> str:
    """The CLI's one-line `error: ...`, or the last line it printed."""
    lines = _lines(log)
    errors = [ln for ln in lines if ln.startswith("error: ")]
    if errors:
        return errors[-1].removeprefix("error: ")
    tail = next((ln.strip() for ln in reversed(lines) if ln.strip()), "")
    return f"the training process exited with code {code}" + (f": {tail[-300:]}" if tail else "")


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        pass


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the studio dies, however it dies (Linux), so a job is never left
    training unobserved; its checkpoint is where the restarted studio continues it."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
