"""/v1/models: the models a request may name (pool.created: bundled bases, finished jobs' models, the CLI's finished
runs, models under --models). /v1/chat/completions and /v1/completions over the same pool are export/serve.py's
`add_generation_routes` (the same code as `tunesmith serve`), added by build_studio."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from tunesmith.export.serve import openai_error
from tunesmith.studio.pool import created

router = APIRouter()


@router.get("/v1/models")
async def models(request: Request):
    return {"object": "list", "data": await asyncio.to_thread(created, request.app.state.pool)}


@router.get("/v1/models/{model_id:path}")
async def model(request: Request, model_id: str):
    found = next((m for m in await asyncio.to_thread(created, request.app.state.pool) if m["id"] == model_id), None)
    return found or openai_error(404, f"model {model_id!r} does not exist", "model", "model_not_found")
