"""What the studio's HTTP API reads and writes, in one place (vLLM's `protocol.py`): the request bodies (OpenAI's job
request and the page's own), the OpenAI objects a response carries (file, job, event, checkpoint), and the one
mapping from a `metrics.jsonl` row to the names OpenAI's events use (`loss` -> `train_loss`, ...).

Plain pydantic models and dict builders: no service, no I/O beyond what a builder is handed. The routers
(studio/routers/) validate with these and answer with these; the services (runs.py, submit.py, files.py, ...) never
see HTTP.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from tunesmith.export.serve import openai_error

# ---------------------------------------------------------------- a metrics row as OpenAI names it

# metrics.jsonl's name -> the name in a job's metrics event, its checkpoints and its result file (OpenAI's)
METRIC_NAMES = {"loss": "train_loss", "eval_loss": "valid_loss", "lr": "learning_rate", "tok_s": "tokens_per_second"}
# kept under their own names
EVENT_KEYS = ("step", "total_steps", "tokens", "elapsed", "epoch")
# what an online-RL step adds to its metrics event (objectives/rl.py): the page charts the reward
RL_HEALTH = ("reward", "reward_std", "frac_reward_zero_std", "clipped_ratio", "completion_length", "entropy", "kl",
             "rollout_reused")


def event_name(key: str) -> str:
    """The name a metrics.jsonl key has in an event (`loss` -> `train_loss`; others as they are)."""
    return METRIC_NAMES.get(key, key)


def metrics_event(row: dict) -> dict:
    """A metrics.jsonl row as a metrics event's `data`: OpenAI's names for the four it has, the step counters, the
    held-out metrics (`eval_*`) and online RL's health keys; empty values left out."""
    data = {event_name(k): row.get(k) for k in ("step", "total_steps", "loss", "eval_loss", "lr", "tokens", "tok_s",
                                                "elapsed", "epoch")}
    data = {k: v for k, v in data.items() if v is not None}
    data.update({k: v for k, v in row.items() if k.startswith("eval_") and k != "eval_loss"})
    data.update({k: row[k] for k in RL_HEALTH if k in row})
    return data


# ---------------------------------------------------------------- request bodies: OpenAI's job request

class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: Union[Literal["auto"], int, None] = None
    batch_size: Union[Literal["auto"], int, None] = None
    learning_rate_multiplier: Union[Literal["auto"], float, None] = None
    beta: Union[Literal["auto"], float, None] = None


class MethodPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Optional[Hyperparameters] = None


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "dpo"]
    supervised: Optional[MethodPart] = None
    dpo: Optional[MethodPart] = None


class Extension(BaseModel):
    """tunesmith's addition to the job request: a built-in recipe, key=value overrides of config keys (jobs.Policy),
    and the resources a job asks of a Ray cluster (checked by jobs.plan_job)."""
    model_config = ConfigDict(extra="forbid")
    recipe: Optional[str] = None
    overrides: list[str] = Field(default_factory=list)
    resources: Optional[dict[str, float]] = None   # cpus, gpus, memory_gb (per process), nodes, processes a job asks of a Ray cluster (docs/scaling.md)


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    training_file: str
    validation_file: Optional[str] = None
    suffix: Optional[str] = None
    seed: Optional[int] = None
    hyperparameters: Optional[Hyperparameters] = None
    method: Optional[Method] = None
    metadata: Optional[dict[str, str]] = None
    integrations: Optional[list[Any]] = None
    tunesmith: Optional[Extension] = None


# ---------------------------------------------------------------- request bodies: the page's own (/v1/studio/...)

class Settings(BaseModel):
    """A job's settings as the new-run form has them, before a job exists (inspect, plan). `objective` is OpenAI's
    `method.type` (supervised or dpo); tunesmith's own `method.name` (the PEFT technique) is an override."""
    model_config = ConfigDict(extra="forbid")
    model: str
    training_file: Optional[str] = None
    validation_file: Optional[str] = None
    recipe: Optional[str] = None
    method: Literal["supervised", "dpo"] = "supervised"
    overrides: list[str] = Field(default_factory=list)
    hyperparameters: dict = Field(default_factory=dict)

    def job_request(self) -> dict:
        """The same settings as POST /v1/fine_tuning/jobs's body (JobRequest's dict): what the job would be."""
        return {"model": self.model, "training_file": self.training_file, "validation_file": self.validation_file,
                "method": {"type": self.method},
                "hyperparameters": self.hyperparameters,
                "tunesmith": {"recipe": self.recipe, "overrides": self.overrides}}


class JudgeStart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    a: Optional[str] = None   # default: the run's base model
    b: Optional[str] = None   # default: the run's tuned model
    n: int = Field(10, ge=1, le=200)


class Verdict(BaseModel):
    model_config = ConfigDict(extra="forbid")
    choice: Literal["first", "second", "tie"]


EXPORT_FORMATS = ("hf", "gguf", "adapter")


class ExportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["hf", "gguf", "adapter"] = "hf"


# ---------------------------------------------------------------- OpenAI's objects

def not_found(kind: str, ident: str, param: str):
    """OpenAI's 404 for an id that names nothing (`file_not_found`, `fine-tuning_job_not_found`, ...)."""
    return openai_error(404, f"no {kind} with id {ident!r}", param, f"{kind.replace(' ', '_')}_not_found")


def after_id(found: list[dict], after: Optional[str]) -> list[dict]:
    """The objects after the one with id `after` (none when it is not among them; all of them when `after` is None):
    OpenAI's cursor paging."""
    if after:
        ids = [o["id"] for o in found]
        found = found[ids.index(after) + 1:] if after in ids else []
    return found


def file_object(row: dict) -> dict:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": row["status"],
            "status_details": row["status_details"], "expires_at": None,
            "tunesmith": {"format": row["format"], "records": row["records"]}}


def fine_tuned_model(job: dict, step: Optional[int] = None) -> str:
    """`ft:BASE:SUFFIX:ID` (OpenAI's shape), and `:ckpt-step-N` for a checkpoint's."""
    req = json.loads(job["request"])
    name = f"ft:{req['_plan']['base']}:{req.get('suffix') or ''}:{job['id'].split('-')[1][:12]}"
    return name if step is None else f"{name}:ckpt-step-{step}"


def job_object(row: dict, events: list[dict]) -> dict:
    """A job as OpenAI's `fine_tuning.job`; `events` are its newest (store.events), for its step and finish."""
    req = json.loads(row["request"])
    plan = req["_plan"]
    hp = plan["hyperparameters"]
    kind = (req.get("method") or {}).get("type", "supervised")
    progress = _progress(row, events)
    return {
        "id": row["id"], "object": "fine_tuning.job", "created_at": row["created_at"],
        "error": json.loads(row["error"]) if row["error"] else None,
        "fine_tuned_model": row["fine_tuned_model"], "finished_at": row["finished_at"],
        "hyperparameters": {k: v for k, v in hp.items() if k != "beta"}, "model": req["model"],
        "organization_id": "tunesmith", "result_files": json.loads(row["result_files"]), "seed": req.get("seed", 0),
        "status": row["status"], "trained_tokens": row["trained_tokens"], "training_file": req["training_file"],
        "validation_file": req.get("validation_file"), "estimated_finish": progress.pop("estimated_finish", None),
        "integrations": None, "metadata": req.get("metadata"), "user_provided_suffix": req.get("suffix"),
        "method": {"type": kind, kind: {"hyperparameters": hp}},
        "tunesmith": {"recipe": plan["recipe"], "overrides": (req.get("tunesmith") or {}).get("overrides", []),
                      "run": Path(row["run_dir"]).name, **progress},
    }


def _progress(row: dict, events: list[dict]) -> dict:
    """Step, total steps and an estimated finish from the newest metrics event of a running job."""
    data = next((json.loads(e["data"]) for e in events if e["type"] == "metrics" and e["data"]
                 and "train_loss" in json.loads(e["data"])), None)
    if not data:
        return {}
    out = {"step": data.get("step"), "total_steps": data.get("total_steps")}
    if row["status"] == "running" and data.get("total_steps") and data.get("elapsed") and data.get("step"):
        per_step = data["elapsed"] / data["step"]
        out["estimated_finish"] = int(time.time() + per_step * (data["total_steps"] - data["step"]))
    return out


def event_seq(event_id: Optional[str]) -> Optional[int]:
    """The number at the end of an event's id (`ftevent-...-N`), which the store pages by."""
    if not event_id:
        return None
    tail = event_id.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def event_object(job_id: str, e: dict) -> dict:
    return {"id": f"ftevent-{job_id.split('-')[1][:12]}-{e['seq']}", "object": "fine_tuning.job.event",
            "created_at": e["created_at"], "level": e["level"], "message": e["message"], "type": e["type"],
            "data": json.loads(e["data"]) if e["data"] else None}


def checkpoint_object(job: dict, c: dict) -> dict:
    short = job["id"].split("-")[1][:12]
    return {"id": f"ftckpt-{short}-{c['step']}", "object": "fine_tuning.job.checkpoint", "created_at": c["created_at"],
            "fine_tuned_model_checkpoint": fine_tuned_model(job, c["step"]),
            "fine_tuning_job_id": job["id"], "metrics": c["metrics"], "step_number": c["step"]}
