"""`tunesmith studio`: OpenAI's fine-tuning API on this machine -- files, jobs, events, checkpoints -- and the tuned
models served at once, in one process. Code written for OpenAI's API (or the providers that copied its schema)
works by changing `base_url`; docs/studio.md has the SDK example and what differs.

  /v1/files                                  upload (multipart, purpose=fine-tune), list, retrieve, content, delete
  /v1/fine_tuning/jobs                       create, list (after/limit)
  /v1/fine_tuning/jobs/{id}                  retrieve; /cancel, /pause, /resume; /events (paginated); /checkpoints
  /v1/fine_tuning/jobs/{id}/events/stream    server-sent events, replaying from Last-Event-ID (an extension)
  /v1/models, /v1/chat/completions, /v1/completions   the base models by name, finished jobs by fine_tuned_model
  /health

Every upload is read and checked by the data layer at once, as training would read it (status `processed`, or
`error` with the file's line and field); it is stored as `HOME/files/<file id>`: a client's file name is shown,
never used as a path. Jobs run as `tunesmith train` subprocesses (jobs.py), recorded in SQLite (store.py); the
models are served by pool.py.

Who may call it and what a request may reach (docs/studio.md, "Security"): every request is checked by guard.py
before any route runs and before its body is read -- a key (made at the first start, kept in `HOME/.token`), the
Host on a loopback bind, the Origin of state-changing requests, the body's size. A router added to this app later is
behind the same checks with nothing to do (guard.py says how). What a request may name is the operator's choice at
start (`Policy`, jobs.py): `model` is a bundled name, a finished job's model or a model under a `--models` folder;
data comes from uploads (or `--data-root` folders); `tunesmith.overrides` are held to an allow-list, and code
(function rewards, teachers by path, hub ids) runs only with `--allow-code`. Error bodies name no server path.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

from fastapi import FastAPI, File, Form, UploadFile
from fastapi import Request as HTTPRequest
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from tunesmith.errors import TunesmithError
from tunesmith.export.serve import add_generation_routes, openai_error
from tunesmith.run.files import write_bytes_atomic
from tunesmith.models.load import BUNDLED
from tunesmith.studio.check import check_upload
from tunesmith.studio.guard import guard, load_or_make_token
from tunesmith.studio.jobs import (JobError, Policy, Runner, checkpoints, metrics_csv, model_in_folders, new_id,
                                   plan_job, public_text, resumable)
from tunesmith.studio.pool import ModelPool, created, installed_bundled
from tunesmith.studio.store import TERMINAL, Store
from tunesmith.studio.ui import add_ui_routes, static_routes

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")
SUFFIX_RE = re.compile(r"^[A-Za-z0-9_-]{1,40}$")


@dataclass
class Studio:
    home: Path
    api_key: Optional[str] = None
    loopback_only_hosts: bool = True
    workers: int = 1
    max_file_bytes: int = 512 << 20
    max_body_bytes: int = 1 << 20
    max_tokens_cap: int = 1024
    max_prompts: int = 16
    chars_per_token: int = 32      # a prompt over the context x this many characters is refused untokenised (serve.py)
    max_loaded_models: int = 2
    runs_dirs: tuple = ()          # more runs folders the web page lists (runs started from the CLI)
    no_auth: bool = False          # --no-auth: no key at all (loopback only; the CLI refuses it elsewhere)
    models_dirs: tuple = ()        # --models DIR: models a request may name (by their path inside DIR)
    data_roots: tuple = ()         # --data-root DIR: data.path / data.val_path a request may name
    allow_code: bool = False       # --allow-code: function rewards, teachers by path, hub ids, any config key
    max_check_bytes: int = 1 << 30  # decoded data one upload's check may build (check.py)
    max_streams: int = 64           # event streams open at once

    @property
    def policy(self) -> Policy:
        return Policy(self.allow_code, tuple(Path(d) for d in self.models_dirs), tuple(Path(d) for d in self.data_roots))


# ---------------------------------------------------------------- request bodies (OpenAI's shapes)

class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: Union[Literal["auto"], int, None] = None
    batch_size: Union[Literal["auto"], int, None] = None
    learning_rate_multiplier: Union[Literal["auto"], float, None] = None
    beta: Union[Literal["auto"], float, None] = None


class MethodPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Optional[Hyperparameters] = None


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "dpo"]
    supervised: Optional[MethodPart] = None
    dpo: Optional[MethodPart] = None


class Extension(BaseModel):
    """tunesmith's one addition to the job request: a built-in recipe, and key=value overrides of any config key."""
    model_config = ConfigDict(extra="forbid")
    recipe: Optional[str] = None
    overrides: list[str] = Field(default_factory=list)


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    training_file: str
    validation_file: Optional[str] = None
    suffix: Optional[str] = None
    seed: Optional[int] = None
    hyperparameters: Optional[Hyperparameters] = None
    method: Optional[Method] = None
    metadata: Optional[dict[str, str]] = None
    integrations: Optional[list[Any]] = None
    tunesmith: Optional[Extension] = None


# ---------------------------------------------------------------- the app

def build_studio(studio: Studio, port: int = 0):
    home = Path(studio.home)
    for sub in ("files", "runs", "jobs"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    home_lock = _lock_home(home, port)  # one studio per home, held until the app has shut down
    if studio.api_key is None and not studio.no_auth:
        studio.api_key = load_or_make_token(home)
    policy = studio.policy
    store = Store(home / "studio.db")
    pool = ModelPool(store, studio, studio.max_loaded_models)
    pool.models_dirs = policy.models_dirs
    runner = Runner(store, home, studio.workers, results=lambda job: _results(store, home, job),
                    public=lambda text: public_text(text, home, policy), allow_code=policy.allow_code)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        runner.start()
        yield
        try:
            await asyncio.to_thread(runner.shutdown)  # running jobs checkpoint, and continue when the studio starts again
            pool.stop()
            store.close()
        finally:
            home_lock.close()

    app = FastAPI(title="tunesmith studio", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.store, app.state.runner, app.state.pool, app.state.api_key = store, runner, pool, studio.api_key
    guard(app, studio.api_key, studio.loopback_only_hosts,
          body_limit=lambda path: studio.max_file_bytes + (1 << 20) if path == "/v1/files" else studio.max_body_bytes)
    error = openai_error

    streams = {"open": 0}  # event streams now open (at most studio.max_streams)

    def not_found(kind: str, ident: str, param: str):
        return error(404, f"no {kind} with id {ident!r}", param, f"{kind.replace(' ', '_')}_not_found")

    # ---- files
    @app.post("/v1/files")
    async def upload(file: UploadFile = File(...), purpose: str = Form(...)):
        if purpose != "fine-tune":
            return error(400, f"purpose {purpose!r} is not served here; use \"fine-tune\"", "purpose")
        filename = _display_name(file.filename or "upload")
        suffix = Path(filename).suffix.lower()
        if suffix not in FILE_SUFFIXES:
            return error(400, f"{filename}: unsupported file type {suffix or '(none)'!r}; supported: "
                              f"{', '.join(FILE_SUFFIXES)}", "file")
        file_id = new_id("file")
        stored = home / "files" / f"{file_id}{suffix}"
        try:
            size = await asyncio.to_thread(_save_upload, file.file, stored)  # spooled by Starlette; copied, not held
        except OSError as e:
            stored.with_name(stored.name + ".part").unlink(missing_ok=True)
            if e.errno == errno.ENOSPC:
                return error(507, f"{filename}: the studio's disk is full; free space and upload it again", "file",
                             "insufficient_storage")
            raise
        if size > studio.max_file_bytes:
            stored.unlink(missing_ok=True)
            return error(413, f"{filename}: larger than the studio's limit of {studio.max_file_bytes} bytes", "file")
        try:
            fmt, records = await asyncio.to_thread(check_upload, stored, filename, studio.max_check_bytes)
            status, details = "processed", None
        except TunesmithError as e:
            fmt, records, status, details = None, None, "error", public_text(str(e), home, policy)
        store.add_file({"id": file_id, "filename": filename, "purpose": purpose, "bytes": size,
                        "created_at": int(time.time()), "status": status, "status_details": details,
                        "stored": stored.name, "format": fmt, "records": records})
        return _file_object(store.file(file_id))

    @app.get("/v1/files")
    async def list_files(purpose: Optional[str] = None, limit: int = 10_000, after: Optional[str] = None):
        rows = store.files(purpose)
        if after:
            ids = [r["id"] for r in rows]
            rows = rows[ids.index(after) + 1:] if after in ids else []
        return {"object": "list", "data": [_file_object(r) for r in rows[:limit]], "has_more": len(rows) > limit}

    @app.get("/v1/files/{file_id}")
    async def get_file(file_id: str):
        row = store.file(file_id)
        return _file_object(row) if row else not_found("file", file_id, "file_id")

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str):
        row = store.file(file_id)
        if not row:
            return not_found("file", file_id, "file_id")
        return FileResponse(home / "files" / row["stored"], media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str):
        row = store.file(file_id)
        if not row:
            return not_found("file", file_id, "file_id")
        users = [j["id"] for j in store.jobs(limit=10_000)
                 if file_id in (json.loads(j["request"]).get("training_file"), json.loads(j["request"]).get("validation_file"))
                 and (j["status"] not in TERMINAL or resumable(j, runner.run_dir(j["id"])))]
        if users:
            return error(409, f"file {file_id} is used by job {users[0]}, which has not ended or can still be resumed",
                         "file_id", "file_in_use")
        store.delete_file(file_id)
        (home / "files" / row["stored"]).unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}

    # ---- jobs
    @app.post("/v1/fine_tuning/jobs")
    async def create_job(req: JobRequest):
        try:
            body = await asyncio.to_thread(_prepare_job, store, home, req, policy)
        except JobError as e:
            return error(e.status, public_text(str(e), home, policy), e.param, e.code)
        job_id = body.pop("_id")
        store.add_job(job_id, body, str(runner.run_dir(job_id).path), "validating_files")
        store.add_event(job_id, f"Created fine-tuning job: {job_id}")
        store.add_event(job_id, "Validating training file: " + req.training_file
                        + (f" and validation file: {req.validation_file}" if req.validation_file else ""))
        return _job_object(store.job(job_id), runner)

    @app.get("/v1/fine_tuning/jobs")
    async def list_jobs(after: Optional[str] = None, limit: int = 20):
        limit = max(1, min(int(limit), 100))
        rows = store.jobs(after, limit + 1)
        return {"object": "list", "data": [_job_object(r, runner) for r in rows[:limit]], "has_more": len(rows) > limit}

    def job_or_404(job_id: str):
        row = store.job(job_id)
        return (row, None) if row else (None, not_found("fine-tuning job", job_id, "fine_tuning_job_id"))

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    async def get_job(job_id: str):
        row, err = job_or_404(job_id)
        return err or _job_object(row, runner)

    def change(job_id: str, allowed, refusal: str, action):
        """cancel / pause / resume: the job as it is after `action`, or OpenAI's 400 when its status does not allow it."""
        row, err = job_or_404(job_id)
        if err:
            return err
        if not allowed(row):
            return error(400, f"job {job_id} is {row['status']}; {refusal}", "fine_tuning_job_id", "invalid_job_status")
        action()
        return _job_object(store.job(job_id), runner)

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    async def cancel(job_id: str):
        return change(job_id, lambda row: row["status"] not in TERMINAL, "only a job that has not ended can be cancelled",
                      lambda: runner.stop(job_id, "cancel"))

    @app.post("/v1/fine_tuning/jobs/{job_id}/pause")
    async def pause(job_id: str):
        return change(job_id, lambda row: row["status"] in ("running", "queued"),
                      "only a queued or running job can be paused", lambda: runner.stop(job_id, "pause"))

    @app.post("/v1/fine_tuning/jobs/{job_id}/resume")
    async def resume(job_id: str):
        return change(job_id, lambda row: resumable(row, runner.run_dir(job_id)) and not row["stop"]
                      and job_id not in runner.running,
                      "a paused or cancelled job, or a failed one with a checkpoint, can be resumed once its process "
                      "has stopped",
                      lambda: runner.resume(job_id))

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    async def events(job_id: str, after: Optional[str] = None, limit: int = 20):
        row, err = job_or_404(job_id)
        if err:
            return err
        limit = max(1, min(int(limit), 1000))
        rows = store.events(job_id, before_seq=_event_seq(after), limit=limit + 1)
        return {"object": "list", "data": [_event_object(job_id, e) for e in rows[:limit]], "has_more": len(rows) > limit}

    @app.get("/v1/fine_tuning/jobs/{job_id}/events/stream")
    async def stream(job_id: str, http: HTTPRequest, after: Optional[int] = None):
        row, err = job_or_404(job_id)
        if err:
            return err
        last = http.headers.get("last-event-id")
        start = int(last) if last and last.isdigit() else (after or 0)
        if streams["open"] >= studio.max_streams:
            return error(429, f"{studio.max_streams} event streams are open already; poll /events or retry shortly",
                         code="rate_limit_exceeded", headers={"Retry-After": "5"})
        return StreamingResponse(_event_stream(store, job_id, start, http, streams, runner.stopping),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    async def list_checkpoints(job_id: str, after: Optional[str] = None, limit: int = 10):
        row, err = job_or_404(job_id)
        if err:
            return err
        found = [_checkpoint_object(row, c) for c in checkpoints(runner.run_dir(job_id))]
        if after:
            ids = [c["id"] for c in found]
            found = found[ids.index(after) + 1:] if after in ids else []
        return {"object": "list", "data": found[:limit], "has_more": len(found) > limit,
                "first_id": found[0]["id"] if found else None, "last_id": found[:limit][-1]["id"] if found else None}

    # ---- models
    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": await asyncio.to_thread(created, pool)}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        found = next((m for m in await asyncio.to_thread(created, pool) if m["id"] == model_id), None)
        return found or error(404, f"model {model_id!r} does not exist", "model", "model_not_found")

    add_generation_routes(app, pool.target, pool.names, studio)
    add_ui_routes(app, home, [Path(d) for d in studio.runs_dirs], store, pool,
                  prepare_files=lambda req: _job_inputs(store, home, req, policy), policy=policy)
    static_routes(app)
    from tunesmith.studio.tinker_routes import studio_tinker_router  # the Tinker training API, /api/v1 (its docstring)
    app.include_router(studio_tinker_router(home, studio))

    @app.get("/health")
    async def health():
        ok = runner.alive or runner.thread is None
        body = {"status": "ok" if ok else "job scheduler not running", "jobs_running": len(runner.running),
                "models_loaded": len(pool.loaded), "scheduler_error": runner.last_error}
        return JSONResponse(body, status_code=200 if ok else 503)

    return app


def run_studio(app, host: str, port: int) -> None:
    """Serve until SIGINT/SIGTERM, which ends within seconds even with event streams open (they are closed after
    `timeout_graceful_shutdown`); then the running jobs checkpoint."""
    import uvicorn

    uvicorn.Server(server_config(app, host, port)).run()


def server_config(app, host: str, port: int, **kw):
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, **{"log_level": "warning", "limit_concurrency": 512,
                                                         "timeout_graceful_shutdown": 5, **kw})


# ---------------------------------------------------------------- helpers

def _lock_home(home: Path, port: int):
    """`HOME/.studio.lock`, locked (flock) for the studio's life and naming its pid and port; a second studio on the
    same home is refused with the first one's."""
    import fcntl
    import os

    fh = open(home / ".studio.lock", "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        try:
            first = json.loads(fh.read() or "{}")
        except ValueError:
            first = {}
        fh.close()
        raise TunesmithError(f"the studio home {home} is in use by another studio (pid {first.get('pid', '?')}, port "
                             f"{first.get('port', '?')}); stop it first, or pass another --home") from None
    fh.seek(0)
    fh.truncate()
    fh.write(json.dumps({"pid": os.getpid(), "port": port}))
    fh.flush()
    return fh


def _display_name(name: str) -> str:
    """What a client called its file, for display only: the last path part, printable, at most 200 characters."""
    name = re.split(r"[\\/]", name)[-1]
    name = "".join(c for c in name if c.isprintable()).strip() or "upload"
    return name[-200:]


def _save_upload(src, stored: Path) -> int:
    """Copy an upload's spooled file into the studio's files folder; its size in bytes."""
    import shutil

    src.seek(0)
    tmp = stored.with_name(stored.name + ".part")
    with open(tmp, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
    size = tmp.stat().st_size
    tmp.replace(stored)
    return size


def _resolve_model(store: Store, name: str, policy: Policy = Policy()) -> tuple[str, str, str]:
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


def _job_inputs(store: Store, home: Path, req: dict, policy: Policy = Policy()) -> tuple[str, str, Path, Optional[Path], str]:
    """(model.name, base label, training file, validation file) of a job request; raises JobError naming the field."""
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
    model_name, base, ident = _resolve_model(store, req["model"], policy)
    return model_name, base, files["training_file"], files.get("validation_file"), ident


def _prepare_job(store: Store, home: Path, req: JobRequest, policy: Policy = Policy()) -> dict:
    """The job's stored request: what was asked plus its resolved plan (`_plan`); raises JobError on a bad request."""
    if req.integrations:
        raise JobError("integrations are not served here (metrics are in the job's events and result file)", "integrations")
    if req.suffix is not None and not SUFFIX_RE.match(req.suffix):
        raise JobError("suffix: 1-40 letters, digits, '-' or '_'", "suffix")
    body = req.model_dump(exclude_none=True)
    model_name, base, train_path, val_path, ident = _job_inputs(store, home, body, policy)
    plan = plan_job(body, model_name, base, train_path, val_path, policy)
    job_id = new_id("ftjob")
    body.update({"_id": job_id, "_model_source": model_name, "_model_id": ident, "_plan": asdict(plan)})
    return body


def _fine_tuned_model(job: dict) -> str:
    req = json.loads(job["request"])
    return f"ft:{req['_plan']['base']}:{req.get('suffix') or ''}:{job['id'].split('-')[1][:12]}"


def _results(store: Store, home: Path, job: dict) -> dict:
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
    return {"fine_tuned_model": _fine_tuned_model(job), "result_files": json.dumps([file_id]), "trained_tokens": tokens}


def _file_object(row: dict) -> dict:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": row["status"],
            "status_details": row["status_details"], "expires_at": None,
            "tunesmith": {"format": row["format"], "records": row["records"]}}


def _job_object(row: dict, runner: Runner) -> dict:
    req = json.loads(row["request"])
    plan = req["_plan"]
    hp = plan["hyperparameters"]
    kind = (req.get("method") or {}).get("type", "supervised")
    progress = _progress(runner, row)
    return {
        "id": row["id"], "object": "fine_tuning.job", "created_at": row["created_at"],
        "error": json.loads(row["error"]) if row["error"] else None,
        "fine_tuned_model": row["fine_tuned_model"], "finished_at": row["finished_at"],
        "hyperparameters": {k: v for k, v in hp.items() if k != "beta"}, "model": req["model"],
        "organization_id": "tunesmith", "result_files": json.loads(row["result_files"]), "seed": req.get("seed", 0),
        "status": row["status"], "trained_tokens": row["trained_tokens"], "training_file": req["training_file"],
        "validation_file": req.get("validation_file"), "estimated_finish": progress.pop("estimated_finish", None),
        "integrations": None, "metadata": req.get("metadata"), "user_provided_suffix": req.get("suffix"),
        "method": {"type": kind, kind: {"hyperparameters": hp}},
        "tunesmith": {"recipe": plan["recipe"], "overrides": (req.get("tunesmith") or {}).get("overrides", []),
                      "run": Path(row["run_dir"]).name, **progress},
    }


def _progress(runner: Runner, row: dict) -> dict:
    """Step, total steps and an estimated finish from the newest metrics event of a running job."""
    latest = runner.store.events(row["id"], limit=50)
    data = next((json.loads(e["data"]) for e in latest if e["type"] == "metrics" and e["data"]
                 and "train_loss" in json.loads(e["data"])), None)
    if not data:
        return {}
    out = {"step": data.get("step"), "total_steps": data.get("total_steps")}
    if row["status"] == "running" and data.get("total_steps") and data.get("elapsed") and data.get("step"):
        per_step = data["elapsed"] / data["step"]
        out["estimated_finish"] = int(time.time() + per_step * (data["total_steps"] - data["step"]))
    return out


def _event_seq(event_id: Optional[str]) -> Optional[int]:
    if not event_id:
        return None
    tail = event_id.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _event_object(job_id: str, e: dict) -> dict:
    return {"id": f"ftevent-{job_id.split('-')[1][:12]}-{e['seq']}", "object": "fine_tuning.job.event",
            "created_at": e["created_at"], "level": e["level"], "message": e["message"], "type": e["type"],
            "data": json.loads(e["data"]) if e["data"] else None}


def _checkpoint_object(job: dict, c: dict) -> dict:
    short = job["id"].split("-")[1][:12]
    req = json.loads(job["request"])
    return {"id": f"ftckpt-{short}-{c['step']}", "object": "fine_tuning.job.checkpoint", "created_at": c["created_at"],
            "fine_tuned_model_checkpoint": f"ft:{req['_plan']['base']}:{req.get('suffix') or ''}:{short}:ckpt-step-{c['step']}",
            "fine_tuning_job_id": job["id"], "metrics": c["metrics"], "step_number": c["step"]}


async def _event_stream(store: Store, job_id: str, after: int, http: HTTPRequest, streams: dict, stopping):
    """Every event after `after` (SSE `id:` = the event's number, so a client reconnecting with Last-Event-ID gets what
    it missed), then new ones as they come, until the job has ended and all of its events are sent, the client
    leaves, or the studio shuts down. The database is asked only when something was written (`store.version`)."""
    streams["open"] += 1
    try:
        quiet, version = 0.0, -1
        while not stopping.is_set():
            rows = []
            if store.version != version:
                version = store.version
                rows = store.events(job_id, after_seq=after, limit=500, newest_first=False)
                for e in rows:
                    after = e["seq"]
                    yield f"id: {e['seq']}\nevent: {e['type']}\ndata: {json.dumps(_event_object(job_id, e))}\n\n"
                job = store.job(job_id)
                if not rows and job["status"] in TERMINAL and not job["stop"]:  # ended, its process gone
                    yield f"event: end\ndata: {json.dumps({'status': job['status']})}\n\n"
                    return
            if rows:
                quiet, version = 0.0, -1  # there may be more than one page
                continue
            await asyncio.sleep(0.25)
            quiet += 0.25
            if quiet >= 15:  # a comment keeps proxies from closing an idle stream
                quiet = 0.0
                yield ": keep-alive\n\n"
            if await http.is_disconnected():
                return
    finally:
        streams["open"] -= 1
