"""/v1/fine_tuning/jobs: create (the request resolved and planned by submit.prepare_job; the scheduler, jobs.Runner,
validates and runs it), list, retrieve, cancel / pause / resume, events (paginated, and as server-sent events from
Last-Event-ID: events.EventStreams), checkpoints."""
from __future__ import annotations

import asyncio
from typing import Callable, Optional

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from tunesmith.export.serve import openai_error
from tunesmith.studio.jobs import JobError, checkpoints, resumable
from tunesmith.studio.protocol import (JobRequest, after_id, checkpoint_object, event_object, event_seq, job_object,
                                       not_found)
from tunesmith.studio.store import TERMINAL
from tunesmith.studio.submit import prepare_job

from .common import public_error

router = APIRouter()


def _job(request: Request, row: dict) -> dict:
    """The job's OpenAI object (its newest events give its step and estimated finish)."""
    return job_object(row, request.app.state.store.events(row["id"], limit=50))


def _job_or_404(request: Request, job_id: str):
    row = request.app.state.store.job(job_id)
    return (row, None) if row else (None, not_found("fine-tuning job", job_id, "fine_tuning_job_id"))


@router.post("/v1/fine_tuning/jobs")
async def create_job(request: Request, req: JobRequest):
    state = request.app.state
    store, runner = state.store, state.runner
    try:
        body = await asyncio.to_thread(prepare_job, store, state.home, req, state.policy)
    except JobError as e:
        return public_error(request, e.status, str(e), e.param, e.code)
    job_id = body.pop("_id")
    store.add_job(job_id, body, str(runner.run_dir(job_id).path), "validating_files")
    store.add_event(job_id, f"Created fine-tuning job: {job_id}")
    store.add_event(job_id, "Validating training file: " + req.training_file
                    + (f" and validation file: {req.validation_file}" if req.validation_file else ""))
    return _job(request, store.job(job_id))


@router.get("/v1/fine_tuning/jobs")
async def list_jobs(request: Request, after: Optional[str] = None, limit: int = 20):
    limit = max(1, min(int(limit), 100))
    rows = request.app.state.store.jobs(after, limit + 1)
    return {"object": "list", "data": [_job(request, r) for r in rows[:limit]], "has_more": len(rows) > limit}


@router.get("/v1/fine_tuning/jobs/{job_id}")
async def get_job(request: Request, job_id: str):
    row, err = _job_or_404(request, job_id)
    return err or _job(request, row)


def _change(request: Request, job_id: str, allowed: Callable[[dict], bool], refusal: str, action: Callable[[], None]):
    """cancel / pause / resume: the job as it is after `action`, or OpenAI's 400 when its status does not allow it."""
    row, err = _job_or_404(request, job_id)
    if err:
        return err
    if not allowed(row):
        return openai_error(400, f"job {job_id} is {row['status']}; {refusal}", "fine_tuning_job_id",
                            "invalid_job_status")
    action()
    return _job(request, request.app.state.store.job(job_id))


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
async def cancel(request: Request, job_id: str):
    runner = request.app.state.runner
    return _change(request, job_id, lambda row: row["status"] not in TERMINAL,
                   "only a job that has not ended can be cancelled", lambda: runner.stop(job_id, "cancel"))


@router.post("/v1/fine_tuning/jobs/{job_id}/pause")
async def pause(request: Request, job_id: str):
    runner = request.app.state.runner
    return _change(request, job_id, lambda row: row["status"] in ("running", "queued"),
                   "only a queued or running job can be paused", lambda: runner.stop(job_id, "pause"))


@router.post("/v1/fine_tuning/jobs/{job_id}/resume")
async def resume(request: Request, job_id: str):
    runner = request.app.state.runner
    return _change(request, job_id, lambda row: resumable(row, runner.run_dir(job_id)) and not row["stop"]
                   and job_id not in runner.running,
                   "a paused or cancelled job, or a failed one with a checkpoint, can be resumed once its process "
                   "has stopped",
                   lambda: runner.resume(job_id))


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
async def events(request: Request, job_id: str, after: Optional[str] = None, limit: int = 20):
    row, err = _job_or_404(request, job_id)
    if err:
        return err
    limit = max(1, min(int(limit), 1000))
    rows = request.app.state.store.events(job_id, before_seq=event_seq(after), limit=limit + 1)
    return {"object": "list", "data": [event_object(job_id, e) for e in rows[:limit]], "has_more": len(rows) > limit}


@router.get("/v1/fine_tuning/jobs/{job_id}/events/stream")
async def stream(request: Request, job_id: str, after: Optional[int] = None):
    row, err = _job_or_404(request, job_id)
    if err:
        return err
    last = request.headers.get("last-event-id")
    start = int(last) if last and last.isdigit() else (after or 0)
    streams = request.app.state.streams
    if streams.full:
        return openai_error(429, f"{streams.limit} event streams are open already; poll /events or retry shortly",
                            code="rate_limit_exceeded", headers={"Retry-After": "5"})
    return StreamingResponse(streams.follow(job_id, start, request), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
async def list_checkpoints(request: Request, job_id: str, after: Optional[str] = None, limit: int = 10):
    row, err = _job_or_404(request, job_id)
    if err:
        return err
    found = [checkpoint_object(row, c) for c in checkpoints(request.app.state.runner.run_dir(job_id))]
    found = after_id(found, after)
    return {"object": "list", "data": found[:limit], "has_more": len(found) > limit,
            "first_id": found[0]["id"] if found else None, "last_id": found[:limit][-1]["id"] if found else None}
