"""The judgement loop (studio/loop.py): a run's lineage with each generation's win rate over its parent, *Train on
these judgements* (a child job from the judged model on the run's judgements), and importing judgements from another
person or session.

  GET  /v1/studio/runs/{name}/lineage               base -> v1 -> v2 ..., each vs its parent; this run's children
  POST /v1/studio/runs/{name}/train-on-judgements   {"method": "dpo" | "reward", ...} -> the child job (OpenAI's object)
  POST /v1/studio/runs/{name}/judgements            {"filename", "content"}: a judgements JSONL merged into the run's
"""
from __future__ import annotations

import asyncio
from typing import Literal, Optional

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from tunesmith.errors import TunesmithError
from tunesmith.evaluate.human import judgements, summarize
from tunesmith.evaluate.report import write_report
from tunesmith.studio import loop
from tunesmith.studio.jobs import JobError
from tunesmith.studio.protocol import Hyperparameters, job_object

from .common import public_error, run_or_404

router = APIRouter()


class TrainOnJudgements(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal["dpo", "reward"] = "dpo"
    suffix: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9_-]{1,40}$")
    hyperparameters: Optional[Hyperparameters] = None
    overrides: list[str] = Field(default_factory=list, max_length=100)


class JudgementsImport(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filename: str = Field("judgements.jsonl", max_length=200)
    content: str


def _context(request: Request):
    state = request.app.state
    return state.runs.folders(), state.store, state.policy


@router.get("/v1/studio/runs/{name}/lineage")
async def run_lineage(request: Request, name: str):
    run, err = run_or_404(request, name)
    if err:
        return err

    def work():
        folders, store, policy = _context(request)
        generations = loop.lineage_view(run, folders, store, policy)
        return {"object": "list", "data": generations, "children": loop.children(name, folders, store),
                "methods": loop.METHODS}
    return await asyncio.to_thread(work)


@router.post("/v1/studio/runs/{name}/train-on-judgements")
async def train_on_judgements(request: Request, name: str, body: TrainOnJudgements):
    run, err = run_or_404(request, name)
    if err:
        return err
    state = request.app.state
    hp = body.hyperparameters.model_dump(exclude_none=True) if body.hyperparameters else {}
    try:
        job = await asyncio.to_thread(loop.child_job, name, run, body.method, state.store, state.home, state.policy,
                                      hp, body.overrides, body.suffix)
    except JobError as e:
        return public_error(request, e.status, str(e), e.param, e.code)
    job_id = job.pop("_id")
    pairs = job["_pairs"]
    state.store.add_job(job_id, job, str(state.runner.run_dir(job_id).path), "validating_files")
    state.store.add_event(job_id, f"Created fine-tuning job: {job_id}")
    state.store.add_event(job_id, f"Training on the judgements of run {name} ({loop.METHODS[body.method]}): "
                                  f"{pairs['judgements']} judgements -> {pairs['pairs']} preference pairs (dropped "
                                  f"{pairs['dropped_ties']} ties, {pairs['dropped_identical']} between identical answers, "
                                  f"{pairs['dropped_unusable']} unusable lines)")
    row = state.store.job(job_id)
    return {**job_object(row, state.store.events(job_id, limit=50)), "parent_run": name, "judgements": pairs}


@router.post("/v1/studio/runs/{name}/judgements")
async def import_judgements(request: Request, name: str, body: JudgementsImport):
    run, err = run_or_404(request, name)
    if err:
        return err
    shown = body.filename.replace("\\", "/").rsplit("/", 1)[-1] or "judgements.jsonl"  # a name to show, not a path
    try:
        counts = loop.import_judgements(run, body.content, shown)  # on the event loop: no verdict is appended meanwhile
    except TunesmithError as e:
        return public_error(request, 400, str(e), "content", "invalid_judgements")
    if counts["imported"] and run.summary.exists():
        await asyncio.to_thread(write_report, run.path)
    return {**counts, "summary": summarize(judgements(run.path))}
