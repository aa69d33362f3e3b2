"""/v1/studio/runs: every run in the runs folders (the studio's and --runs) with its status and headline metric
(runs.RunIndex, runs.run_row); one run's page data (with the charts its task declares), its metrics rows (as
metrics.jsonl has them: the declared charts' keys), its log and its files. No response names a server path (runs are `runs/NAME`)."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from tunesmith.run.files import read_jsonl
from tunesmith.studio.runs import RUN_FILES

from .common import public_error, run_or_404

router = APIRouter()


@router.get("/v1/studio/runs")
async def runs(request: Request):
    return {"object": "list", "data": await asyncio.to_thread(request.app.state.runs.rows)}


@router.get("/v1/studio/runs/{name}")
async def run_info(request: Request, name: str):
    def work():
        run, err = run_or_404(request, name)
        return err or request.app.state.runs.detail(name, run)
    return await asyncio.to_thread(work)


@router.get("/v1/studio/runs/{name}/metrics")
async def run_metrics(request: Request, name: str, since: int = 0):
    """metrics.jsonl's rows as the run wrote them (the keys the task's declared charts name: run JSON `shows`), from
    row `since` on; `next` is the `since` of the next poll (a live run's page reads only the new rows)."""
    run, err = run_or_404(request, name)
    if err:
        return err
    rows = read_jsonl(run.metrics) if run.metrics.exists() else []
    return {"object": "list", "data": rows[max(0, since):], "next": len(rows)}


@router.get("/v1/studio/runs/{name}/log")
async def run_log(request: Request, name: str, lines: int = 200):
    run, err = run_or_404(request, name)
    if err:
        return err
    text = run.log.read_text(errors="replace") if run.log.exists() else ""
    text = request.app.state.runs.public(text.replace(str(run.path), f"runs/{name}"))  # no server paths
    return {"lines": text.splitlines()[-max(1, min(lines, 5000)):]}


@router.get("/v1/studio/runs/{name}/files/{file}")
async def run_file(request: Request, name: str, file: str):
    run, err = run_or_404(request, name)
    if err:
        return err
    if file not in RUN_FILES or not (run.path / file).is_file():
        return public_error(request, 404, f"run {name} has no file {file!r}", "file")
    return FileResponse(run.path / file)
