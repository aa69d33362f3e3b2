"""The runs the studio shows: every run folder under the studio's `HOME/runs` and the operator's `--runs` folders (runs
started from the CLI), by name (the studio's own first: its name wins), with the job that made it when there is one.

`RunIndex` is the service the runs, judge and export routes call (and ModelPool asks for the CLI's finished runs as
served models: `served_runs`); `run_row` is one line of the runs table, `run_detail` what the run page reads.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tunesmith.catalog import describe_task, task_shows_json
from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.evaluate.human import judgements, summarize
from tunesmith.run import RunDir
from tunesmith.run.files import read_jsonl
from tunesmith.run.lock import holder
from tunesmith.studio.jobs import Policy, model_in_folders, public_text
from tunesmith.studio.pool import installed_bundled
from tunesmith.studio.store import Store

RUN_FILES = ("report.html", "training.png", "metrics.png", "config.yaml", "eval.json")


@dataclass
class RunIndex:
    home: Path
    runs_dirs: tuple[Path, ...]
    store: Store
    policy: Policy

    def folders(self) -> dict[str, Path]:
        """Run name -> folder, over the runs folders (the studio's own first: its name wins)."""
        found = {}
        for folder in reversed([self.home / "runs", *self.runs_dirs]):
            if folder.is_dir():
                for p in sorted(folder.iterdir()):
                    if (p / "config.yaml").is_file() and not p.name.startswith("."):
                        found[p.name] = p
        return found

    def jobs_by_run(self) -> dict[str, dict]:
        return {Path(j["run_dir"]).name: j for j in self.store.jobs(limit=1_000_000)}

    def find(self, name: str) -> Optional[RunDir]:
        """The run named `name`, or None; a job's run whose folder is not made yet (validating, queued) is found."""
        path = self.folders().get(name)
        if path is None and name in self.jobs_by_run():
            path = self.home / "runs" / name
        return RunDir(path) if path else None

    def rows(self) -> list[dict]:
        """The runs table, newest first. Reads every run's files: call it off the event loop."""
        jobs = self.jobs_by_run()
        return [run_row(name, RunDir(p), jobs.get(name))
                for name, p in sorted(self.folders().items(), key=lambda kv: -kv[1].stat().st_mtime)]

    def detail(self, name: str, run: RunDir) -> dict:
        """What the run page reads: its row (run_row), summary.json, config.yaml (no server paths), the human
        judgements, and `shows`: what its task declares (catalog.task_shows_json: the charts to draw from its metrics
        rows, each curve a metrics.jsonl key; None for a run whose task is not known)."""
        row = run_row(name, run, self.jobs_by_run().get(name))
        row["summary"] = read_json(run.summary)
        row["config"] = self.public(run.config.read_text()) if run.config.exists() else ""
        row["human"] = summarize(judgements(run.path))
        row["shows"] = task_shows_json(row["task"])  # its charts (raw metrics.jsonl keys), headline, verdict
        return row

    def public(self, text: str) -> str:
        return public_text(text, self.home, self.policy)

    def default_pair(self, name: str, run: RunDir) -> tuple[str, str]:
        """The models a blind A/B of this run compares by default: its parent (the base, or the run it continued) and
        its tuned model, by the names the studio serves them under (never a server path: loop.default_pair)."""
        from tunesmith.studio.loop import default_pair

        return default_pair(name, run, self.folders(), self.store, self.policy)

    def served_runs(self) -> dict:
        """The finished runs not made by a job, and their base models (when local or bundled), as served models
        (model id -> (source, created)): ModelPool.extra_sources."""
        found, jobs = {}, self.jobs_by_run()
        for name, p in self.folders().items():
            if name in jobs or not RunDir(p).is_finished():
                continue
            found[name] = (str(p), int(p.stat().st_mtime))
            try:
                base = load_config(str(p / "config.yaml")).model.name
            except TunesmithError:
                continue
            if base in installed_bundled():
                found.setdefault(base, (base, 0))
            elif (model := model_in_folders(base, self.policy.models_dirs)):  # listed by its id, not by its path
                found.setdefault(model[1], (str(model[0]), 0))
        return found


def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_status(run: RunDir, job: Optional[dict]) -> str:
    """The job's status; for a run started from the CLI: running (its lock is held), succeeded (final/ exists),
    stopped (it has a checkpoint to resume) or incomplete."""
    if job:
        return job["status"]
    if holder(run.path):
        return "running"
    if run.is_finished():
        return "succeeded"
    return "stopped" if run.checkpoints.is_dir() and any(run.checkpoints.iterdir()) else "incomplete"


def headline(task: str, summary: dict) -> dict:
    """The runs table's measure of a run, as its task declares it (catalog.describe_task): `metric` (the key in
    summary.json's before/after), `value` (after), `before`, `metric_label`, `higher_is_better`, `percent` (a
    fraction shown as %). A run whose summary lacks the declared headline (or whose task is unknown) shows its
    held-out loss when it has one; none: every field None or False."""
    shows = describe_task(task)
    after, before = summary.get("after") or {}, summary.get("before") or {}
    if shows and shows.headline in after:
        key, label, higher, percent = shows.headline, shows.label, shows.higher_is_better, shows.percent
    elif "eval_loss" in after:
        key, label, higher, percent = "eval_loss", "held-out loss", False, False
    else:
        key, label, higher, percent = None, None, False, False
    return {"metric": key, "value": after.get(key), "before": before.get(key), "metric_label": label,
            "higher_is_better": higher, "percent": percent}


def run_row(name: str, run: RunDir, job: Optional[dict]) -> dict:
    """One line of the runs table: status, task, method, base, headline metric (`headline`), duration, progress."""
    try:
        if not run.config.exists():
            raise TunesmithError("no config yet")
        cfg = load_config(str(run.config))
        task, method, base = cfg.task, cfg.method.name, cfg.model.name
    except TunesmithError:
        task = method = base = "?"
        if job:  # a job whose run folder is not made yet (validating, queued): its plan says the base
            base = (json.loads(job["request"]).get("_plan") or {}).get("base", base)
    if job and task in ("auto", "?"):  # the task its data decides, known when the job was created (submit.py)
        req = json.loads(job["request"])
        task = req.get("_task") or (req.get("_plan") or {}).get("task", task)
    summary = read_json(run.summary) or {}
    task = summary.get("task", task)
    rows = read_jsonl(run.metrics) if run.metrics.exists() else []
    steps = [r for r in rows if "loss" in r]
    return {"name": name, "status": run_status(run, job), "job": job["id"] if job else None,
            "model": job["fine_tuned_model"] if job and job["fine_tuned_model"] else (name if run.is_finished() else None),
            "task": task, "method": method, "base": Path(str(base)).name, **headline(task, summary),
            "step": steps[-1]["step"] if steps else 0,
            "total_steps": steps[-1].get("total_steps") if steps else None,
            "seconds": steps[-1].get("elapsed") if steps else None,
            "created_at": int(run.path.stat().st_mtime) if run.path.exists() else job["created_at"],
            "report": run.report.exists()}
