"""/v1/studio/runs/{name}/export: `tunesmith export` of a finished run, one at a time (exports.Exporter), and the
export folder as a zip."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response

from tunesmith.studio.exports import ExportFailed, zip_folder
from tunesmith.studio.protocol import EXPORT_FORMATS, ExportRequest

from .common import public_error, run_or_404

router = APIRouter()


@router.post("/v1/studio/runs/{name}/export")
async def export(request: Request, name: str, body: ExportRequest):
    run, err = run_or_404(request, name)
    if err:
        return err
    if not run.is_finished():
        return public_error(request, 400, f"run {name} has not finished training (no final/)", "run")
    exporter = request.app.state.exporter
    if exporter.busy:
        return public_error(request, 429, "an export is running; one at a time (retry when it has finished)",
                            code="rate_limit_exceeded", headers={"Retry-After": "10"})
    try:
        return await exporter.export(name, run, body.format)
    except ExportFailed as e:
        return public_error(request, 400, str(e), "format")


@router.get("/v1/studio/runs/{name}/export/{fmt}.zip")
async def export_zip(request: Request, name: str, fmt: str):
    run, err = run_or_404(request, name)
    if err:
        return err
    folder = run.exports / fmt
    if fmt not in EXPORT_FORMATS or not folder.is_dir():
        return public_error(request, 404, f"run {name} has no {fmt} export yet", "format")
    data = await asyncio.to_thread(zip_folder, folder, f"{name}-{fmt}")
    return Response(data, media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{name}-{fmt}.zip"'})
