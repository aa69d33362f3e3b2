"""The web page at `/` and its static files (studio/static; the chart library, plotly.js, is served from the
installed `plotly` package: nothing comes from a CDN, and nothing is built on the user's machine), and /health.
These are the public paths (guard.PUBLIC): they carry nothing of the user's."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse

from tunesmith.export.serve import openai_error

STATIC = Path(__file__).parent.parent / "static"
MEDIA_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}

router = APIRouter()


@router.get("/")
async def index():
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/static/{name}")
async def static(name: str):
    if name == "plotly.min.js":
        return FileResponse(_chart_js(), media_type="text/javascript")
    files = {p.name: p for p in STATIC.iterdir()}
    if name not in files:
        return openai_error(404, f"no static file {name!r}")
    return FileResponse(files[name], media_type=MEDIA_TYPES.get(files[name].suffix, "text/plain"))


def _chart_js() -> Path:
    """plotly.min.js of the installed plotly package, found without importing plotly (the studio never runs it)."""
    return Path(importlib.util.find_spec("plotly").origin).parent / "package_data" / "plotly.min.js"


@router.get("/health")
async def health(request: Request):
    runner, pool = request.app.state.runner, request.app.state.pool
    ok = runner.alive or runner.thread is None
    body = {"status": "ok" if ok else "job scheduler not running", "jobs_running": len(runner.running),
            "models_loaded": len(pool.loaded), "scheduler_error": runner.last_error}
    return JSONResponse(body, status_code=200 if ok else 503)
