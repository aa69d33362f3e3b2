"""/v1/studio/runs/{name}/judge: blind A/B sessions over a run's held-out prompts (studio/judge.py) -- start one (two
served models answer), read it, record a verdict (the run's report is rewritten with it) -- and the run's
judgements as a download."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response

from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.evaluate.report import write_report
from tunesmith.studio import judge as sessions
from tunesmith.studio.protocol import JudgeStart, Verdict

from .common import public_error, run_or_404

router = APIRouter()


@router.post("/v1/studio/runs/{name}/judge")
async def judge_start(request: Request, name: str, body: JudgeStart):
    run, err = run_or_404(request, name)
    if err:
        return err
    pool = request.app.state.pool
    a, b = request.app.state.runs.default_pair(name, run)
    a, b = body.a or a, body.b or b
    ta, tb = await pool.target(a), await pool.target(b)
    if ta is None or tb is None:
        return public_error(request, 404, f"model {a if ta is None else b!r} is not served here; see /v1/models",
                            "model", "model_not_found")
    cfg = load_config(str(run.config))
    try:
        await asyncio.to_thread(sessions.start_session, run, cfg, a, b, ta, tb, body.n)
    except TunesmithError as e:
        return public_error(request, 400, str(e))
    return sessions.session_state(run)


@router.get("/v1/studio/runs/{name}/judge")
async def judge_state(request: Request, name: str):
    run, err = run_or_404(request, name)
    return err or sessions.session_state(run)


@router.post("/v1/studio/runs/{name}/judge/{index}")
async def judge(request: Request, name: str, index: int, body: Verdict):
    run, err = run_or_404(request, name)
    if err:
        return err
    if sessions.record_verdict(run, index, body.choice) is None:
        return public_error(request, 404, f"no pair {index} to judge in run {name}", "index")
    if run.summary.exists():
        await asyncio.to_thread(write_report, run.path)
    return sessions.session_state(run)


@router.get("/v1/studio/runs/{name}/judgements.jsonl")
async def judgements_file(request: Request, name: str):
    run, err = run_or_404(request, name)
    if err:
        return err
    path = run.judgements
    return Response(path.read_bytes() if path.exists() else b"", media_type="application/x-ndjson",
                    headers={"Content-Disposition": f'attachment; filename="{name}-judgements.jsonl"'})
