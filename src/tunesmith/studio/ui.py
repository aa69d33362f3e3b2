"""What the studio's web page needs beyond OpenAI's API, as plain JSON endpoints under /v1/studio (a script can use
every one of them), and the page itself at `/` (static files in studio/static; the chart library, plotly.js, is
served from the installed `plotly` package: nothing comes from a CDN, and nothing is built on the user's machine).

  GET  /v1/studio/options                      recipes, bundled models, methods
  POST /v1/studio/inspect, /v1/studio/plan     `tunesmith data inspect` / `tunesmith plan` for a job's settings
  GET  /v1/studio/runs                         every run in the runs folders (the studio's and --runs), with status
  GET  /v1/studio/runs/{name}[/metrics|/log|/files/{report.html,...}]
  POST /v1/studio/runs/{name}/judge            blind A/B pairs over held-out prompts; GET them; POST .../judge/{i}
  GET  /v1/studio/runs/{name}/judgements.jsonl the judgements
  POST /v1/studio/runs/{name}/export           `tunesmith export`; GET .../export/{format}.zip downloads it
"""
from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import random
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Literal, Optional

from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from tunesmith.catalog import METHOD_NAMES
from tunesmith.config import list_recipes, load_config
from tunesmith.errors import TunesmithError
from tunesmith.evaluate.human import judgements, summarize
from tunesmith.evaluate.report import write_report
from tunesmith.export.serve import openai_error
from tunesmith.models.engine import Request, Sampling
from tunesmith.run import RunDir
from tunesmith.run.files import append_jsonl, read_jsonl, write_json_atomic
from tunesmith.run.lock import holder
from tunesmith.paths import child_env
from tunesmith.studio.jobs import JobError, Policy, model_in_folders, plan_job, public_text
from tunesmith.studio.pool import installed_bundled

STATIC = Path(__file__).with_name("static")
RUN_FILES = ("report.html", "training.png", "metrics.png", "config.yaml", "eval.json")
PAIRS = "judge-pairs.json"


class Settings(BaseModel):
    """A job's settings as the new-run form has them (what POST /v1/fine_tuning/jobs would get)."""
    model_config = ConfigDict(extra="forbid")
    model: str
    training_file: Optional[str] = None
    validation_file: Optional[str] = None
    recipe: Optional[str] = None
    method: Literal["supervised", "dpo"] = "supervised"
    overrides: list[str] = Field(default_factory=list)
    hyperparameters: dict = Field(default_factory=dict)


class JudgeStart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    a: Optional[str] = None   # default: the run's base model
    b: Optional[str] = None   # default: the run's tuned model
    n: int = Field(10, ge=1, le=200)


class Verdict(BaseModel):
    model_config = ConfigDict(extra="forbid")
    choice: Literal["first", "second", "tie"]


class ExportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["hf", "gguf", "adapter"] = "hf"


def static_routes(app) -> None:
    # the file of the installed plotly package, found without importing plotly (the studio never runs it)
    chart_js = Path(importlib.util.find_spec("plotly").origin).parent / "package_data" / "plotly.min.js"

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/{name}")
    async def static(name: str):
        if name == "plotly.min.js":
            return FileResponse(chart_js, media_type="text/javascript")
        files = {p.name: p for p in STATIC.iterdir()}
        if name not in files:
            return openai_error(404, f"no static file {name!r}")
        kind = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}.get(files[name].suffix, "text/plain")
        return FileResponse(files[name], media_type=kind)


def add_ui_routes(app, home: Path, runs_dirs: list[Path], store, pool, prepare_files, policy: Policy = Policy()) -> None:
    def error(status, message, *rest, **kw):
        return openai_error(status, public_text(message, home, policy), *rest, **kw)

    def run_index() -> dict[str, Path]:
        """Run name -> folder, over the runs folders (the studio's own first: its name wins)."""
        found = {}
        for folder in reversed([home / "runs", *runs_dirs]):
            if folder.is_dir():
                for p in sorted(folder.iterdir()):
                    if (p / "config.yaml").is_file() and not p.name.startswith("."):
                        found[p.name] = p
        return found

    def jobs_by_run() -> dict[str, dict]:
        return {Path(j["run_dir"]).name: j for j in store.jobs(limit=1_000_000)}

    def run_or_404(name: str):
        path = run_index().get(name)
        if path is None and name in jobs_by_run():  # a job whose run folder is not made yet (validating, queued)
            path = home / "runs" / name
        return (RunDir(path), None) if path else (None, error(404, f"no run named {name!r}", "run", "run_not_found"))

    def cli_runs() -> dict:
        """The finished runs not made by a job, and their base models (when local or bundled), as served models."""
        found, jobs = {}, jobs_by_run()
        for name, p in run_index().items():
            if name in jobs or not RunDir(p).is_finished():
                continue
            found[name] = (str(p), int(p.stat().st_mtime))
            try:
                base = load_config(str(p / "config.yaml")).model.name
            except TunesmithError:
                continue
            if base in installed_bundled():
                found.setdefault(base, (base, 0))
            elif (model := model_in_folders(base, policy.models_dirs)):  # listed by its id, not by its path
                found.setdefault(model[1], (str(model[0]), 0))
        return found

    pool.extra_sources = cli_runs
    exporting = asyncio.Lock()  # one export at a time (each may take minutes and a model's size in memory)

    @app.get("/v1/studio/options")
    async def options():
        recipes = []
        for name, path in list_recipes().items():
            lines = [ln[1:].strip() for ln in path.read_text().splitlines() if ln.startswith("#")]
            recipes.append({"name": name, "about": next((ln for ln in lines[1:] if ln), "")})
        return {"recipes": recipes, "models": installed_bundled(), "methods": list(METHOD_NAMES)}

    def settings_config(s: Settings):
        req = {"model": s.model, "training_file": s.training_file, "method": {"type": s.method},
               "hyperparameters": s.hyperparameters, "tunesmith": {"recipe": s.recipe, "overrides": s.overrides}}
        model_name, base, train_path, val_path, _ = prepare_files(req)
        plan = plan_job(req, model_name, base, train_path, val_path, policy)
        return load_config(plan.source, plan.overrides)

    @app.post("/v1/studio/inspect")
    async def inspect(s: Settings):
        def work():
            from tunesmith.data.inspect import inspect_data
            from tunesmith.models import load_tokenizer, resolve_model_dir

            cfg = settings_config(s)
            return inspect_data(cfg, load_tokenizer(resolve_model_dir(cfg.model.name)), 1, color=False)
        try:
            text = await asyncio.to_thread(work)
        except (JobError, TunesmithError) as e:
            return error(400, str(e), getattr(e, "param", None))
        for ident in (s.training_file, s.validation_file):  # the files as the user named them
            if ident and (f := store.file(ident)):
                text = text.replace(str(home / "files" / f["stored"]), f["filename"])
        return {"text": public_text(text, home, policy)}

    @app.post("/v1/studio/plan")
    async def plan(s: Settings):
        def work():
            from tunesmith.train.plan import plan_config

            return plan_config(settings_config(s))
        try:
            p = await asyncio.to_thread(work)
        except (JobError, TunesmithError) as e:
            return error(400, str(e), getattr(e, "param", None))
        return {"text": public_text(p.describe(), home, policy), "fits": p.fits, "total_bytes": p.total, "available_bytes": p.available,
                "seconds": p.seconds, "tokens": p.tokens}

    @app.get("/v1/studio/runs")
    async def runs():
        def rows():  # reads every run's files: off the event loop
            jobs = jobs_by_run()
            return [_run_row(name, RunDir(p), jobs.get(name)) for name, p in
                    sorted(run_index().items(), key=lambda kv: -kv[1].stat().st_mtime)]
        return {"object": "list", "data": await asyncio.to_thread(rows)}

    @app.get("/v1/studio/runs/{name}")
    async def run_info(name: str):
        def work():
            run, err = run_or_404(name)
            if err:
                return err
            row = _run_row(name, run, jobs_by_run().get(name))
            row["summary"] = _json(run.summary)
            row["config"] = public_text(run.config.read_text(), home, policy) if run.config.exists() else ""
            row["human"] = summarize(judgements(run.path))
            return row
        return await asyncio.to_thread(work)

    @app.get("/v1/studio/runs/{name}/metrics")
    async def run_metrics(name: str):
        run, err = run_or_404(name)
        return err or {"object": "list", "data": read_jsonl(run.metrics) if run.metrics.exists() else []}

    @app.get("/v1/studio/runs/{name}/log")
    async def run_log(name: str, lines: int = 200):
        run, err = run_or_404(name)
        if err:
            return err
        text = run.log.read_text(errors="replace") if run.log.exists() else ""
        text = public_text(text.replace(str(run.path), f"runs/{name}"), home, policy)  # no server paths
        return {"lines": text.splitlines()[-max(1, min(lines, 5000)):]}

    @app.get("/v1/studio/runs/{name}/files/{file}")
    async def run_file(name: str, file: str):
        run, err = run_or_404(name)
        if err:
            return err
        if file not in RUN_FILES or not (run.path / file).is_file():
            return error(404, f"run {name} has no file {file!r}", "file")
        return FileResponse(run.path / file)

    # ---- blind A/B
    def default_pair(name: str, run: RunDir) -> tuple[str, str]:
        job = jobs_by_run().get(name)
        if job:
            return json.loads(job["request"])["model"], job["fine_tuned_model"]
        return load_config(str(run.config)).model.name, name

    @app.post("/v1/studio/runs/{name}/judge")
    async def judge_start(name: str, body: JudgeStart):
        run, err = run_or_404(name)
        if err:
            return err
        a, b = default_pair(name, run)
        a, b = body.a or a, body.b or b
        ta, tb = await pool.target(a), await pool.target(b)
        if ta is None or tb is None:
            return error(404, f"model {a if ta is None else b!r} is not served here; see /v1/models", "model",
                         "model_not_found")
        cfg = load_config(str(run.config))

        def work():
            from tunesmith.data.prepare import heldout_prompts

            prompts = heldout_prompts(cfg.data, body.n)
            answers = {side: _answers(t, [p["messages"] for p in prompts], cfg.eval.max_new_tokens)
                       for side, t in (("a", ta), ("b", tb))}
            rng = random.Random()
            pairs = [{**p, "answer_a": answers["a"][i], "answer_b": answers["b"][i], "first": rng.choice("ab")}
                     for i, p in enumerate(prompts)]
            write_json_atomic(run.path / PAIRS, {"a": a, "b": b, "created_at": int(time.time()), "pairs": pairs})
        try:
            await asyncio.to_thread(work)
        except TunesmithError as e:
            return error(400, str(e))
        return await judge_state(name)

    @app.get("/v1/studio/runs/{name}/judge")
    async def judge_state(name: str):
        run, err = run_or_404(name)
        if err:
            return err
        session = _json(run.path / PAIRS)
        if not session:
            return {"pairs": [], "next": None, "summary": summarize(judgements(run.path))}
        done = {r["index"] for r in judgements(run.path) if r.get("session") == session["created_at"]}
        shown = [{"index": i, "prompt": p["messages"][-1]["content"] if p["messages"] else "",
                  "first": p["answer_" + p["first"]], "second": p["answer_" + ("b" if p["first"] == "a" else "a")],
                  "judged": i in done} for i, p in enumerate(session["pairs"])]
        nxt = next((s["index"] for s in shown if not s["judged"]), None)
        return {"pairs": shown, "next": nxt, "summary": summarize(judgements(run.path))}

    @app.post("/v1/studio/runs/{name}/judge/{index}")
    async def judge(name: str, index: int, body: Verdict):
        run, err = run_or_404(name)
        if err:
            return err
        session = _json(run.path / PAIRS)
        if not session or not 0 <= index < len(session["pairs"]):
            return error(404, f"no pair {index} to judge in run {name}", "index")
        p = session["pairs"][index]
        second = "b" if p["first"] == "a" else "a"
        winner = {"first": p["first"], "second": second, "tie": "tie"}[body.choice]
        append_jsonl(run.judgements, {
            "session": session["created_at"], "index": index, "prompt": p["messages"], "reference": p["reference"],
            "a": session["a"], "b": session["b"], "answer_a": p["answer_a"], "answer_b": p["answer_b"],
            "winner": winner, "shown_first": p["first"], "at": int(time.time())})
        if run.summary.exists():
            await asyncio.to_thread(write_report, run.path)
        return await judge_state(name)

    @app.get("/v1/studio/runs/{name}/judgements.jsonl")
    async def judgements_file(name: str):
        run, err = run_or_404(name)
        if err:
            return err
        path = run.judgements
        return Response(path.read_bytes() if path.exists() else b"", media_type="application/x-ndjson",
                        headers={"Content-Disposition": f'attachment; filename="{name}-judgements.jsonl"'})

    # ---- export
    @app.post("/v1/studio/runs/{name}/export")
    async def export(name: str, body: ExportRequest):
        run, err = run_or_404(name)
        if err:
            return err
        if not run.is_finished():
            return error(400, f"run {name} has not finished training (no final/)", "run")
        if exporting.locked():
            return error(429, "an export is running; one at a time (retry when it has finished)",
                         code="rate_limit_exceeded", headers={"Retry-After": "10"})
        cmd = [sys.executable, "-m", "tunesmith.cli.main", "export", str(run.path), "--format", body.format, "--overwrite"]
        async with exporting:
            done = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=3600,
                                           env=child_env())
        lines = (done.stdout + done.stderr).strip().splitlines()
        if done.returncode != 0:
            message = next((ln[7:] for ln in reversed(lines) if ln.startswith("error: ")), lines[-1] if lines else "failed")
            return error(400, message.replace(str(run.path), name), "format")
        folder = run.exports / body.format
        return {"format": body.format, "output": [ln.replace(str(run.path), name) for ln in lines[-12:]],
                "files": sorted(p.name for p in folder.iterdir()) if folder.is_dir() else [],
                "download": f"/v1/studio/runs/{name}/export/{body.format}.zip"}

    @app.get("/v1/studio/runs/{name}/export/{fmt}.zip")
    async def export_zip(name: str, fmt: str):
        run, err = run_or_404(name)
        if err:
            return err
        folder = run.exports / fmt
        if fmt not in ("hf", "gguf", "adapter") or not folder.is_dir():
            return error(404, f"run {name} has no {fmt} export yet", "format")

        def pack() -> bytes:
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
                for p in sorted(folder.rglob("*")):
                    if p.is_file() and not p.name.startswith("."):
                        z.write(p, f"{name}-{fmt}/{p.relative_to(folder)}")
            return buf.getvalue()
        data = await asyncio.to_thread(pack)
        return Response(data, media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="{name}-{fmt}.zip"'})


def _answers(target, conversations: list[list[dict]], max_new_tokens: int) -> list[str]:
    """Greedy answers of one served model, all submitted at once (the engine batches them)."""
    reqs = []
    for messages in conversations:
        prompt = target.model.prompts.render(messages, target.tokenizer)
        ids = target.tokenizer(prompt, add_special_tokens=target.model.prompts.add_special_tokens)["input_ids"]
        reqs.append(target.engine.submit(Request(ids, Sampling(max_new_tokens=max_new_tokens), [], target.model.adapter)))
    for r in reqs:
        r.wait()
    return [r.text.strip() for r in reqs]


def _json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _run_row(name: str, run: RunDir, job: Optional[dict]) -> dict:
    """One line of the runs table: status, task, method, base, key metric, duration, progress."""
    try:
        if not run.config.exists():
            raise TunesmithError("no config yet")
        cfg = load_config(str(run.config))
        task, method, base = cfg.task, cfg.method.name, cfg.model.name
    except TunesmithError:
        task = method = base = "?"
    summary = _json(run.summary) or {}
    task = summary.get("task", task)
    rows = read_jsonl(run.metrics) if run.metrics.exists() else []
    steps = [r for r in rows if "loss" in r]
    after = summary.get("after") or {}
    key = next((k for k in ("eval_reward", "eval_accuracy", "eval_pref_accuracy", "eval_loss") if k in after), None)
    if job:
        status = job["status"]
    elif holder(run.path):
        status = "running"
    elif run.is_finished():
        status = "succeeded"
    else:
        status = "stopped" if run.checkpoints.is_dir() and any(run.checkpoints.iterdir()) else "incomplete"
    return {"name": name, "status": status, "job": job["id"] if job else None,
            "model": job["fine_tuned_model"] if job and job["fine_tuned_model"] else (name if run.is_finished() else None),
            "task": task, "method": method, "base": Path(str(base)).name, "metric": key, "value": after.get(key),
            "before": (summary.get("before") or {}).get(key), "step": steps[-1]["step"] if steps else 0,
            "total_steps": steps[-1].get("total_steps") if steps else None,
            "seconds": steps[-1].get("elapsed") if steps else None,
            "created_at": int(run.path.stat().st_mtime) if run.path.exists() else job["created_at"],
            "report": run.report.exists()}
