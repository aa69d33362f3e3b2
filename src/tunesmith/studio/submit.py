"""A job's way in and out, as the studio's routes and its scheduler call it: a job request's model and files resolved
within the operator's `Policy` and planned (`prepare_job`, the same for the page's inspect/plan before a job exists:
`settings_config`), and what a succeeded job carries (`job_results`: its model id and the metrics result file).

The command a plan becomes and the checks of overrides are jobs.py's (`plan_job`, `Policy`); this module only finds
what a request names, and refuses what it may not name with the field it came from (`JobError(param=...)`).
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from tunesmith.catalog import task_of_format
from tunesmith.models.load import BUNDLED
from tunesmith.run.files import write_bytes_atomic
from tunesmith.studio.jobs import JobError, Policy, metrics_csv, model_in_folders, new_id, plan_job
from tunesmith.studio.pool import installed_bundled
from tunesmith.studio.protocol import JobRequest, fine_tuned_model
from tunesmith.studio.store import Store

SUFFIX_RE = re.compile(r"^[A-Za-z0-9_-]{1,40}$")


def resolve_model(store: Store, name: str, policy: Policy = Policy()) -> tuple[str, str, str]:
    """(what model.name gets, the base's label in fine_tuned_model ids, the model's id in /v1/models) for a job's
    `model`: a finished job's model, a bundled name, or a model under the operator's --models folders. Nothing
    outside those is looked at, so the refusal says the same whether such a path exists or not."""
    if name.startswith("ft:"):
        parent = next((j for j in store.jobs(limit=10_000) if j["fine_tuned_model"] == name), None)
        if parent is None or parent["status"] != "succeeded":
            raise JobError(f"model {name!r}: no finished job made it", "model", "model_not_available")
        return parent["run_dir"], name.split(":")[1], name
    if name in BUNDLED:
        if name not in installed_bundled():
            raise JobError(f"model {name!r}: its weights package is not installed ({' '.join(BUNDLED[name].pip_names)})",
                           "model", "model_not_available")
        return name, name, name
    found = model_in_folders(name, policy.models_dirs)
    if found:
        path, ident = found
        return str(path.resolve()), path.stem if path.is_file() else path.name, ident
    available = ", ".join(installed_bundled() + ["a fine_tuned_model id"]
                          + (["a model under the studio's --models folders, by its name there"] if policy.models_dirs else []))
    shown = name if len(name) <= 80 else name[:77] + "..."
    raise JobError(f"model {shown!r} is not available here; available: {available}", "model", "model_not_available")


def job_inputs(store: Store, home: Path, req: dict, policy: Policy = Policy()) -> tuple[str, str, Path, Optional[Path], str]:
    """(model.name, base label, training file, validation file, model id) of a job request; raises JobError naming
    the field."""
    files = {}
    for param in ("training_file", "validation_file"):
        ident = req.get(param)
        if ident is None:
            if param == "training_file":
                raise JobError("training_file: pick or upload a data file", param, "invalid_" + param)
            continue
        f = store.file(ident)
        if f is None:
            raise JobError(f"{param}: no file with id {ident!r}", param, "invalid_" + param)
        if f["purpose"] != "fine-tune":
            raise JobError(f"{param}: file {ident} has purpose {f['purpose']!r}, not fine-tune", param, "invalid_" + param)
        if f["status"] != "processed":
            raise JobError(f"{param}: file {ident} could not be read: {f['status_details']}", param, "invalid_" + param)
        files[param] = home / "files" / f["stored"]
    model_name, base, ident = resolve_model(store, req["model"], policy)
    return model_name, base, files["training_file"], files.get("validation_file"), ident


def prepare_job(store: Store, home: Path, req: JobRequest, policy: Policy = Policy()) -> dict:
    """The job's stored request: what was asked plus its resolved plan (`_plan`); raises JobError on a bad request."""
    if req.integrations:
        raise JobError("integrations are not served here (metrics are in the job's events and result file)", "integrations")
    if req.suffix is not None and not SUFFIX_RE.match(req.suffix):
        raise JobError("suffix: 1-40 letters, digits, '-' or '_'", "suffix")
    body = req.model_dump(exclude_none=True)
    model_name, base, train_path, val_path, ident = job_inputs(store, home, body, policy)
    plan = plan_job(body, model_name, base, train_path, val_path, policy)
    job_id = new_id("ftjob")
    body.update({"_id": job_id, "_model_source": model_name, "_model_id": ident, "_plan": asdict(plan),
                 "_task": resolved_task(store, plan.task, body["training_file"])})
    return body


def resolved_task(store: Store, task: str, training_file: str) -> str:
    """The task the job trains: its config's, or for `task: auto` the one its training file's format decides (as
    training resolves it, data/shapes.resolve_task) -- what the runs table and run page show before eval.json."""
    if task != "auto":
        return task
    f = store.file(training_file)
    return task_of_format(f["format"]) if f and f["format"] else task


def settings_config(store: Store, home: Path, req: dict, policy: Policy = Policy()):
    """The run config a job with these settings (a JobRequest's dict, `Settings.job_request()`) would train."""
    from tunesmith.config import load_config

    model_name, base, train_path, val_path, _ = job_inputs(store, home, req, policy)
    plan = plan_job(req, model_name, base, train_path, val_path, policy)
    return load_config(plan.source, plan.overrides)


def job_results(store: Store, home: Path, job: dict) -> dict:
    """What a succeeded job carries, set with its status in one write (a client never sees `succeeded` without its
    model): its model id, trained tokens, and the metrics CSV as a result file (purpose fine-tune-results)."""
    from tunesmith.run import RunDir

    run = RunDir(job["run_dir"])
    file_id = new_id("file")
    data = metrics_csv(run)
    write_bytes_atomic(home / "files" / f"{file_id}.csv", data)
    store.add_file({"id": file_id, "filename": "step_metrics.csv", "purpose": "fine-tune-results", "bytes": len(data),
                    "created_at": int(time.time()), "status": "processed", "status_details": None,
                    "stored": f"{file_id}.csv", "format": None, "records": None})
    tokens = job["trained_tokens"]
    try:
        tokens = json.loads(run.summary.read_text()).get("tokens", tokens)
    except (OSError, ValueError):
        pass
    return {"fine_tuned_model": fine_tuned_model(job), "result_files": json.dumps([file_id]), "trained_tokens": tokens}
