"""`tunesmith studio`: OpenAI's fine-tuning API on this machine -- files, jobs, events, checkpoints -- and the tuned
models served at once, in one process. Code written for OpenAI's API (or the providers that copied its schema)
works by changing `base_url`; docs/studio.md has the SDK example and what differs.

  /v1/files                                  upload (multipart, purpose=fine-tune), list, retrieve, content, delete
  /v1/fine_tuning/jobs                       create, list (after/limit)
  /v1/fine_tuning/jobs/{id}                  retrieve; /cancel, /pause, /resume; /events (paginated); /checkpoints
  /v1/fine_tuning/jobs/{id}/events/stream    server-sent events, replaying from Last-Event-ID (an extension)
  /v1/models, /v1/chat/completions, /v1/completions   the base models by name, finished jobs by fine_tuned_model
  /health

The page's own routes (/v1/studio/..., the page at `/`) are listed in routers/__init__.py.

The shape is vLLM's OpenAI server: `build_studio` makes the services once and puts them on `app.state`, and
includes one router per resource (routers/: files, jobs, models, plan, runs, judge, loop, export, rl, page), whose
handlers read their services from `request.app.state`; request and response shapes are protocol.py's. The services:
store.py (SQLite: files, jobs, events), jobs.py (`Runner`: jobs as `tunesmith train` subprocesses), pool.py (the
served models), files.py (uploads, read and checked at once as training would read them, stored as
`HOME/files/<file id>`: a client's file name is shown, never used as a path), submit.py (a job request resolved and
planned; what a succeeded job carries), runs.py (the run index and the runs table), judge.py (blind A/B sessions),
exports.py (`tunesmith export` from the page), events.py (event streams), loop.py (the judgement loop).

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
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fastapi import FastAPI

from tunesmith.errors import TunesmithError
from tunesmith.export.serve import add_generation_routes
from tunesmith.studio.events import EventStreams
from tunesmith.studio.exports import Exporter
from tunesmith.studio.files import Files
from tunesmith.studio.guard import guard, load_or_make_token
from tunesmith.studio.jobs import Policy, Runner, public_text
from tunesmith.studio.pool import ModelPool
from tunesmith.studio.routers import export, files, jobs, judge, loop, models, page, plan, rl, runs
from tunesmith.studio.runs import RunIndex
from tunesmith.studio.store import Store
from tunesmith.studio.submit import job_results

# The routers, included in this order (a new one: a module in routers/ with `router = APIRouter()`, and a line here).
ROUTERS = (files.router, jobs.router, models.router, plan.router, runs.router, judge.router, loop.router, export.router,
           rl.router, page.router)


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
    executor: object = None         # where jobs' commands run: jobs.LocalExecutor when None, or ray_executor.RayExecutor

    @property
    def policy(self) -> Policy:
        return Policy(self.allow_code, tuple(Path(d) for d in self.models_dirs), tuple(Path(d) for d in self.data_roots),
                      Path(self.home))


def build_studio(studio: Studio, port: int = 0) -> FastAPI:
    """The studio's app: its services on `app.state` (routers/__init__.py lists them), the routers, the guard."""
    home = Path(studio.home)
    # the operator's folders as this process's directory names them now (jobs run elsewhere: in the home)
    studio.models_dirs, studio.data_roots, studio.runs_dirs = (tuple(Path(d).resolve() for d in folders) for folders in
                                                               (studio.models_dirs, studio.data_roots, studio.runs_dirs))
    for sub in ("files", "runs", "jobs"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    home_lock = _lock_home(home, port)  # one studio per home, held until the app has shut down
    if studio.api_key is None and not studio.no_auth:
        studio.api_key = load_or_make_token(home)
    policy = studio.policy
    store = Store(home / "studio.db")
    runner = Runner(store, home, studio.workers, results=functools.partial(job_results, store, home),
                    public=functools.partial(public_text, home=home, policy=policy), allow_code=policy.allow_code,
                    executor=studio.executor)
    run_index = RunIndex(home, tuple(Path(d) for d in studio.runs_dirs), store, policy)
    pool = ModelPool(store, studio, studio.max_loaded_models)
    pool.models_dirs = policy.models_dirs
    pool.extra_sources = run_index.served_runs  # the CLI's finished runs are served models too

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
    state = app.state
    state.studio, state.home, state.policy, state.api_key = studio, home, policy, studio.api_key
    state.store, state.runner, state.pool, state.runs = store, runner, pool, run_index
    state.files = Files(store, home, policy, studio.max_file_bytes, studio.max_check_bytes)
    state.exporter = Exporter()
    state.streams = EventStreams(store, runner.stopping, studio.max_streams)
    guard(app, studio.api_key, studio.loopback_only_hosts,
          body_limit=lambda path: studio.max_file_bytes + (1 << 20) if path == "/v1/files" else studio.max_body_bytes)
    for router in ROUTERS:
        app.include_router(router)
    add_generation_routes(app, pool.target, pool.names, studio)  # /v1/chat/completions, /v1/completions
    from tunesmith.studio.tinker_routes import studio_tinker_router  # the Tinker training API, /api/v1 (its docstring)
    app.include_router(studio_tinker_router(home, studio))
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
