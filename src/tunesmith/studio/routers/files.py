"""/v1/files: upload (multipart, purpose=fine-tune; read and checked at once: files.Files), list, retrieve, content,
delete (refused while a job still needs the file)."""
from __future__ import annotations

import asyncio
from typing import Optional

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import FileResponse

from tunesmith.export.serve import openai_error
from tunesmith.studio.files import FileRefused
from tunesmith.studio.protocol import after_id, file_object, not_found

router = APIRouter()


@router.post("/v1/files")
async def upload(request: Request, file: UploadFile = File(...), purpose: str = Form(...)):
    if purpose != "fine-tune":
        return openai_error(400, f"purpose {purpose!r} is not served here; use \"fine-tune\"", "purpose")
    try:
        row = await asyncio.to_thread(request.app.state.files.upload, file.file, file.filename, purpose)
    except FileRefused as e:
        return openai_error(e.status, str(e), "file", e.code)
    return file_object(row)


@router.get("/v1/files")
async def list_files(request: Request, purpose: Optional[str] = None, limit: int = 10_000, after: Optional[str] = None):
    rows = after_id(request.app.state.store.files(purpose), after)
    return {"object": "list", "data": [file_object(r) for r in rows[:limit]], "has_more": len(rows) > limit}


@router.get("/v1/files/{file_id}")
async def get_file(request: Request, file_id: str):
    row = request.app.state.store.file(file_id)
    return file_object(row) if row else not_found("file", file_id, "file_id")


@router.get("/v1/files/{file_id}/content")
async def file_content(request: Request, file_id: str):
    files = request.app.state.files
    row = files.store.file(file_id)
    if not row:
        return not_found("file", file_id, "file_id")
    return FileResponse(files.path(row), media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}")
async def delete_file(request: Request, file_id: str):
    files = request.app.state.files
    row = files.store.file(file_id)
    if not row:
        return not_found("file", file_id, "file_id")
    user = files.user(file_id, request.app.state.runner)
    if user:
        return openai_error(409, f"file {file_id} is used by job {user}, which has not ended or can still be resumed",
                            "file_id", "file_in_use")
    files.delete(row)
    return {"id": file_id, "object": "file", "deleted": True}
