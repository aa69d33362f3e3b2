"""The judgement loop in the studio: people's blind A/B verdicts on a run -> a child run trained on them (DPO from the
judged model; or a reward model on them) -> child vs parent judged again on held-out prompts no verdict used -> ...

What the routes (routers/loop.py) call; everything here is the studio's own bookkeeping over pieces that exist
elsewhere: the child is an ordinary job of the job machinery (jobs.plan_job, the Runner: queued, followed, stopped,
resumed like any other), whose config.yaml records its parent (`model.name`: the judged run's folder) and the
judgements it learned from (`data.path`: a snapshot of that run's judgements.jsonl taken when the child was made,
HOME/jobs/<job id>/judgements.jsonl, so a resume after more judgements trains on the same pairs), which is what
evaluate/lineage.py and data/judgements.py read. No request names a path: the child's model and data are the judged run's own, found by the
run's name, and the judgements file is the studio's (Policy is not widened; user overrides still go through
jobs.check_overrides).

A model here is always named as the studio serves it (`served_name`): a bundled name, a `--models` id, a run's name
or a finished job's `fine_tuned_model` -- never a server path (a base model given by its path is shown by its id).
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from tunesmith.config import load_config, read_yaml
from tunesmith.data.judgements import check_judgements_text, read_judgements
from tunesmith.errors import TunesmithError
from tunesmith.evaluate.lineage import lineage, unjudged_prompts
from tunesmith.models.load import BUNDLED
from tunesmith.run import RunDir
from tunesmith.run.files import json_safe, read_jsonl, write_bytes_atomic
from tunesmith.studio.jobs import JobError, Policy, model_in_folders, new_id, plan_job
from tunesmith.studio.store import Store

METHODS = {  # what "Train on these judgements" offers: the child's objective
    "dpo": "DPO from the judged model (winner chosen, loser rejected)",
    "reward": "a reward model on the judgements (step 1 of reward model then GRPO)",
}
MAX_IMPORT_LINES = 10_000   # judgements one import may bring (the request itself is capped by the studio's body limit)


def _jobs_by_run(store: Store) -> dict[str, dict]:
    return {Path(j["run_dir"]).name: j for j in store.jobs(limit=1_000_000)}


def served_name(model: str, folders: dict[str, Path], store: Store, policy: Policy) -> str:
    """How the studio names a model that a config's `model.name` gives: a run folder by its finished job's model id (or
    the run's name), a model under a --models folder by its id there, a bundled or hub name as it is; any other path
    by its last part (so no response shows where it lies)."""
    if model in BUNDLED or not model:
        return model
    path = Path(model).expanduser()
    if not path.exists():
        return model if not path.is_absolute() and ".." not in path.parts else path.name
    real = path.resolve()
    jobs = _jobs_by_run(store)
    for name, folder in folders.items():
        if folder.resolve() == real:
            job = jobs.get(name)
            return job["fine_tuned_model"] if job and job["fine_tuned_model"] else name
    for name, job in jobs.items():
        if Path(job["run_dir"]).resolve() == real:
            return job["fine_tuned_model"] or name
    found = model_in_folders(str(real), policy.models_dirs)
    return found[1] if found else path.name


def aliases(folders: dict[str, Path], store: Store, policy: Policy) -> dict[str, Path]:
    """Every name a judgement may give a model the lineage should recognise: finished jobs' model ids -> their run
    folders, and the --models ids -> their paths."""
    out: dict[str, Path] = {}
    for root in policy.models_dirs:
        for p in sorted(Path(root).iterdir()) if Path(root).is_dir() else []:
            out[p.relative_to(root).as_posix()] = p
    for job in store.jobs(limit=1_000_000):
        if job["fine_tuned_model"]:
            out[job["fine_tuned_model"]] = Path(job["run_dir"])
    out.update(folders)
    return out


def default_pair(name: str, run: RunDir, folders: dict[str, Path], store: Store, policy: Policy) -> tuple[str, str]:
    """The models a blind A/B of this run compares by default -- its parent (the base, or the run it continued) and the
    run's own model -- by the names the studio serves them under."""
    job = _jobs_by_run(store).get(name)
    if job:
        req = json.loads(job["request"])
        return req.get("_model_id") or req["model"], job["fine_tuned_model"] or name
    return served_name(str(load_config(str(run.config)).model.name), folders, store, policy), name


def judge_prompts(run: RunDir, n: int) -> list[dict]:
    """Up to `n` held-out prompts for a new set of pairs of `run`: from the held-out split of the lineage's first run
    that learned from ordinary data (a child trained on judgements has only judged prompts in its own data), leaving
    out every prompt a judgement of this run or of the lineage's training used -- so no verdict is about a prompt the
    child learned from, and no set repeats one already judged."""
    chain = [g for g in lineage(run.path) if g.run is not None]
    root = next((g.run for g in chain if g.judgements is None), run.path)
    used = [g.judgements for g in chain if g.judgements is not None] + [g.run / "judgements.jsonl" for g in chain]
    data = load_config(str(RunDir(root).config)).data
    prompts = unjudged_prompts(data, used, n)
    if not prompts:
        raise TunesmithError(f"every held-out prompt of run {RunDir(root).name} has been judged already (or the run "
                             f"holds none out: data.val_size); train a run with a larger held-out split for more")
    return prompts


def lineage_view(run: RunDir, folders: dict[str, Path], store: Store, policy: Policy) -> list[dict]:
    """The run's generations, base first, each with its model's served name, the judgements it learned from and its
    record against its parent (wins, losses, ties, win rate with its 95 % Wilson interval, sign-test p). A child job
    whose run folder is not made yet (validating, queued) is its parent's lineage and itself."""
    names = aliases(folders, store, policy)
    jobs = _jobs_by_run(store)
    if not run.config.is_file():
        job = jobs.get(run.name)
        parent = (json.loads(job["request"]).get("metadata") or {}).get("judgements_of") if job else None
        if not parent or parent not in folders:
            return []
        above = lineage_view(RunDir(folders[parent]), folders, store, policy)
        return above + [{"name": run.name, "model": job["fine_tuned_model"] or run.name, "run": run.name,
                         "parent": above[-1]["model"] if above else None, "status": job["status"],
                         "learned_from": f"judgements of {parent}", "judgements_of": parent, "vs_parent": None}]
    out = []
    for g in lineage(run.path, names):
        job = jobs.get(g.name) if g.run is not None else None
        judged = _judged(g.judgements, job)
        shown = served_name(g.name, folders, store, policy) if g.run is None else (
            job["fine_tuned_model"] if job and job["fine_tuned_model"] else g.name)
        parent = out[-1]["model"] if out else None
        out.append({"name": shown if g.run is None else g.name, "model": shown, "run": g.name if g.run else None,
                    "parent": parent, "status": (job or {}).get("status") or ("succeeded" if g.run and RunDir(g.run).is_finished() else None),
                    "learned_from": f"judgements of {judged}" if judged else None, "judgements_of": judged,
                    "vs_parent": asdict(g.vs_parent) if g.vs_parent else None})
    return out


def _judged(judgements: Optional[Path], job: Optional[dict]) -> Optional[str]:
    """The run whose judgements a generation learned from: a studio child's job says (its data is a snapshot in its
    job's folder); a run trained on a run's judgements.jsonl directly is that file's folder."""
    if judgements is None:
        return None
    meta = (json.loads(job["request"]).get("metadata") or {}) if job else {}
    return meta.get("judgements_of") or judgements.parent.name


def children(name: str, folders: dict[str, Path], store: Store) -> list[dict]:
    """The studio's jobs that learned from this run's judgements (newest first): id, status, method, model."""
    out = []
    for job in store.jobs(limit=10_000):
        meta = json.loads(job["request"]).get("metadata") or {}
        if meta.get("judgements_of") == name:
            out.append({"run": Path(job["run_dir"]).name, "status": job["status"], "method": meta.get("objective"),
                        "model": job["fine_tuned_model"], "created_at": job["created_at"]})
    return out


def child_job(name: str, run: RunDir, objective: str, store: Store, home: Path, policy: Policy,
              hyperparameters: Optional[dict] = None, overrides: Optional[list[str]] = None,
              suffix: Optional[str] = None) -> dict:
    """The stored request of a job that trains on `run`'s judgements from `run`'s model (objective "dpo" or "reward"),
    ready for store.add_job; JobError (a 400 naming the field) when it cannot run. Its `_plan` is jobs.plan_job's:
    model.name is the judged run's folder, data.path a snapshot of its judgements.jsonl as it is now
    (`snapshot_judgements`, in HOME/jobs/<job id>/), and the user's overrides pass jobs.check_overrides as any job's
    do."""
    if objective not in METHODS:
        raise JobError(f"method: {objective!r} is not offered; choose one of {', '.join(METHODS)}", "method")
    if not run.is_finished():
        raise JobError(f"run {name} has not finished training: there is no model to continue from yet", "run")
    job_id = new_id("ftjob")
    snapshot = snapshot_judgements(run, Path(home) / "jobs" / job_id) if run.judgements.is_file() else None
    try:
        return _child_request(name, run, objective, store, policy, job_id, snapshot, hyperparameters, overrides, suffix)
    except BaseException:
        if snapshot is not None:
            shutil.rmtree(snapshot.parent, ignore_errors=True)
        raise


def snapshot_judgements(run: RunDir, folder: Path) -> Path:
    """A copy of the run's judgements.jsonl as it is now (its whole lines: one being appended is not one yet), written
    atomically as `folder`/judgements.jsonl: what a child job trains on, however many judgements come after."""
    data = run.judgements.read_bytes()
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "judgements.jsonl"
    write_bytes_atomic(path, data[:data.rfind(b"\n") + 1])
    return path


def _child_request(name: str, run: RunDir, objective: str, store: Store, policy: Policy, job_id: str,
                   snapshot: Optional[Path], hyperparameters: Optional[dict], overrides: Optional[list[str]],
                   suffix: Optional[str]) -> dict:
    got = read_judgements(snapshot) if snapshot is not None else None
    if got is None or not got.pairs:
        described = got.describe().replace(str(snapshot), f"runs/{name}/judgements.jsonl") if got else ""
        raise JobError(f"run {name} has no decided judgements to learn from yet" + (f" ({described})" if got else
                       ": judge a set of pairs first (ties teach nothing)"), "judgements", "no_preference_pairs")
    job = _jobs_by_run(store).get(name)
    if job is not None:
        if job["status"] != "succeeded" or not job["fine_tuned_model"]:
            raise JobError(f"run {name}'s job has not succeeded", "run")
        model_id, base = job["fine_tuned_model"], json.loads(job["request"])["_plan"]["base"]
    else:
        model_id, base = name, name
    parent_cfg = read_yaml(run.config)
    judged, judged_eval = parent_cfg.get("data") or {}, parent_cfg.get("eval") or {}
    user = list(overrides or [])
    own = [f"data.template={judged['template']}"] if judged.get("template") not in (None, "chat") else []
    if judged.get("system_prompt"):  # the snapshot is no run's judgements.jsonl: config.judged_run_prompts cannot find it
        own.append(f"data.system_prompt={json.dumps(judged['system_prompt'])}")
    for key in ("max_new_tokens", "samples", "max_examples"):  # evaluated, and its pairs answered, as its parent's were
        if isinstance(judged_eval.get(key), int):
            own.append(f"eval.{key}={judged_eval[key]}")
    if objective == "reward":
        own.append("task=reward")
    req = {"model": model_id, "training_file": None, "suffix": suffix or "judged",
           "method": {"type": "dpo" if objective == "dpo" else "supervised"},
           "hyperparameters": dict(hyperparameters or {}),
           "metadata": {"judgements_of": name, "objective": objective, "pairs": str(len(got.pairs)),
                        "judgements": str(got.judgements)},
           "tunesmith": {"recipe": None, "overrides": own + user}}
    plan = plan_job(req, str(run.path), base, snapshot, None, policy)
    data = load_config(plan.source, plan.overrides).data  # as config.judged_run_prompts refuses for runs/NAME/judgements
    for key, theirs in (("template", judged.get("template", "chat")), ("system_prompt", judged.get("system_prompt"))):
        if getattr(data, key) != theirs:
            raise JobError(f"tunesmith.overrides: run {name}'s judgements judge answers to prompts rendered with "
                           f"data.{key}: {theirs!r}; this job has {getattr(data, key)!r}", "tunesmith.overrides")
    return {**req, "_id": job_id, "_model_source": str(run.path), "_model_id": model_id, "_plan": asdict(plan),
            "_pairs": got.counts() | {"file": f"runs/{name}/judgements.jsonl", "unusable_samples": []}}


def import_judgements(run: RunDir, text: str, filename: str) -> dict:
    """Merge a judgements file someone brings into the run's judgements.jsonl: every line checked first (nothing is
    kept from a file with a bad line: TunesmithError lists them), judgements already there skipped, the rest appended
    in one write (what the file held before is never rewritten). Counts of what happened."""
    rows = check_judgements_text(text, filename, MAX_IMPORT_LINES)
    have = {_key(r) for r in read_jsonl(run.judgements)} if run.judgements.is_file() else set()
    new, seen = [], set(have)
    for row in rows:
        k = _key(row)
        if k in seen:
            continue
        seen.add(k)
        new.append({**row, "imported_from": filename, "imported_at": int(time.time())})
    if new:
        run.path.mkdir(parents=True, exist_ok=True)
        with open(run.judgements, "a", encoding="utf-8") as fh:
            if run.judgements.stat().st_size and not run.judgements.read_bytes().endswith(b"\n"):
                fh.write("\n")  # a line torn by a crash stays its own (unusable) line
            fh.write("".join(json.dumps(json_safe(r), allow_nan=False) + "\n" for r in new))
    return {"read": len(rows), "imported": len(new), "already_there": len(rows) - len(new),
            "total": len(have) + len(new)}


def _key(row: dict) -> str:
    """A judgement's identity: the same verdict by the same person at the same moment is one judgement, however many
    exports it went through."""
    fields = {k: row.get(k) for k in ("prompt", "a", "b", "answer_a", "answer_b", "winner", "session", "index", "at")}
    if isinstance(fields["prompt"], str):
        fields["prompt"] = [{"role": "user", "content": fields["prompt"]}]
    return json.dumps(fields, sort_keys=True)
