"""The studio's HTTP routes, one `APIRouter` per resource (vLLM's `api_router.py` per resource); `build_studio`
(studio/app.py) puts the services on `app.state` and includes the routers in app.py's `ROUTERS`, in that order. A
handler reads its services from `request.app.state` -- never from a closure -- validates with studio/protocol.py's
models, calls a service and answers with protocol's objects:

  files.py    /v1/files[/{id}[/content]]                              upload + check, list, retrieve, delete
  jobs.py     /v1/fine_tuning/jobs[/{id}[/cancel|/pause|/resume|/events[/stream]|/checkpoints]]
  models.py   /v1/models[/{id}]   (/v1/chat/completions and /v1/completions: export/serve.py's, added by build_studio)
  plan.py     /v1/studio/options, /v1/studio/inspect, /v1/studio/plan  the new-run form, before a job exists
  runs.py     /v1/studio/runs[/{name}[/metrics|/log|/files/{file}]]
  judge.py    /v1/studio/runs/{name}/judge[/{index}], /judgements.jsonl  blind A/B
  loop.py     /v1/studio/runs/{name}/lineage, /train-on-judgements, POST /judgements  the judgement loop (loop.py)
  export.py   /v1/studio/runs/{name}/export[/{format}.zip]
  rl.py       /v1/studio/rl/options, /v1/studio/headroom, /v1/studio/runs/{name}/rl  online RL's form and panel
  page.py     /, /static/{name}, /health                              public (guard.PUBLIC)

The services on `app.state` (set once in build_studio): `studio` (the limits, app.Studio), `home`, `policy`,
`store` (store.Store), `runner` (jobs.Runner), `pool` (pool.ModelPool), `runs` (runs.RunIndex), `files`
(files.Files), `exporter` (exports.Exporter), `streams` (events.EventStreams). A new router is a module here with
`router = APIRouter()` and one entry in app.py's `ROUTERS`; guard.py puts it behind the key with nothing to add.
common.py has what several routers share (an error with no server path, a run by name or a 404).
"""
