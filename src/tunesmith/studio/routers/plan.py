"""The new-run form's helpers, before a job exists: the choices it offers (/v1/studio/options) and what `tunesmith
data inspect` and `tunesmith plan` say about its settings (/v1/studio/inspect, /v1/studio/plan), resolved exactly as
a job with these settings would be (submit.settings_config)."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from tunesmith.catalog import METHOD_NAMES
from tunesmith.config import list_recipes
from tunesmith.errors import TunesmithError
from tunesmith.studio.jobs import JobError, public_text
from tunesmith.studio.pool import installed_bundled
from tunesmith.studio.protocol import Settings
from tunesmith.studio.submit import settings_config

from .common import public_error
from .rl import rl_options

router = APIRouter()


@router.get("/v1/studio/options")
async def options(request: Request):
    recipes = []
    for name, path in list_recipes().items():
        lines = [ln[1:].strip() for ln in path.read_text().splitlines() if ln.startswith("#")]
        recipes.append({"name": name, "about": next((ln for ln in lines[1:] if ln), "")})
    state = request.app.state  # rl: the reward kinds, rl.* defaults and reward-model runs RL's choices offer (rl.py)
    return {"recipes": recipes, "models": installed_bundled(), "methods": list(METHOD_NAMES),
            "rl": await asyncio.to_thread(rl_options, state.policy.allow_code, state.home)}


def _config(request: Request, s: Settings):
    state = request.app.state
    return settings_config(state.store, state.home, s.job_request(), state.policy)


@router.post("/v1/studio/inspect")
async def inspect(request: Request, s: Settings):
    state = request.app.state

    def work():
        from tunesmith.data.inspect import inspect_data
        from tunesmith.models import load_tokenizer, resolve_model_dir

        cfg = _config(request, s)
        return inspect_data(cfg, load_tokenizer(resolve_model_dir(cfg.model.name)), 1, color=False)
    try:
        text = await asyncio.to_thread(work)
    except (JobError, TunesmithError) as e:
        return public_error(request, 400, str(e), getattr(e, "param", None))
    for ident in (s.training_file, s.validation_file):  # the files as the user named them
        if ident and (f := state.store.file(ident)):
            text = text.replace(str(state.files.path(f)), f["filename"])
    return {"text": public_text(text, state.home, state.policy)}


@router.post("/v1/studio/plan")
async def plan(request: Request, s: Settings):
    def work():
        from tunesmith.train.plan import plan_config

        return plan_config(_config(request, s))
    try:
        p = await asyncio.to_thread(work)
    except (JobError, TunesmithError) as e:
        return public_error(request, 400, str(e), getattr(e, "param", None))
    state = request.app.state
    return {"text": public_text(p.describe(), state.home, state.policy), "fits": p.fits, "total_bytes": p.total,
            "available_bytes": p.available, "seconds": p.seconds, "tokens": p.tokens}
