"""The studio's models: each finished job's `fine_tuned_model` and the base models answer the OpenAI generation
endpoints through the serving path of `tunesmith serve` (export/serve.py: its engine, limits and errors).

A model is loaded when a request first names it (in a worker thread: the server keeps answering meanwhile), merged
when it is an adapter (one model per engine is the fast case), and kept. Never more than `max_loaded` at once: to
load another, the one used least recently with nothing generating (and idle for IDLE_SECONDS) is stopped and freed;
when every loaded model is busy the request gets 429 (retry shortly) rather than a model past the limit. A job that
finishes adds its model to the list at once.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Optional

from starlette.exceptions import HTTPException

from tunesmith.export.serve import Target, load_served
from tunesmith.models.load import BUNDLED
from tunesmith.studio.jobs import model_in_folders
from tunesmith.studio.store import Store


def installed_bundled() -> list[str]:
    """The bundled base models whose weights packages are installed (only those can be fine-tuned or served)."""
    return [name for name, spec in BUNDLED.items()
            if all(importlib.util.find_spec(pkg) is not None for pkg in (spec.package, *spec.parts))]


IDLE_SECONDS = 2.0  # a model asked for this recently may be about to get its request: it is not evicted


class ModelPool:
    def __init__(self, store: Store, limits, max_loaded: int = 2, max_rows: int = 32, max_waiting: int = 256):
        self.store, self.limits, self.max_loaded = store, limits, max(1, max_loaded)
        self.max_rows, self.max_waiting = max_rows, max_waiting
        self.loaded: "OrderedDict[str, Target]" = OrderedDict()
        self.used: dict[str, float] = {}  # model id -> when a request last asked for it
        self.loading = threading.Lock()
        self.extra_sources = lambda: {}  # more models by id (the web page adds the runs started from the CLI)
        self.models_dirs: tuple = ()     # the operator's --models folders: their models are listed by their ids

    def sources(self) -> dict[str, tuple[str, int]]:
        """Model id -> (what to load, created): the installed bundled bases, the models in the operator's --models
        folders, the bases jobs named, finished jobs. Ids are names, never server paths."""
        found = {name: (name, 0) for name in installed_bundled()}
        for root in self.models_dirs:
            for p in sorted(Path(root).iterdir()) if Path(root).is_dir() else []:
                if (p / "config.json").is_file() or p.suffix == ".gguf":
                    found.setdefault(p.relative_to(root).as_posix(), (str(p), 0))
        for job in self.store.jobs(limit=10_000):
            req = json.loads(job["request"])
            ident = req.get("_model_id")
            if ident and not ident.startswith("ft:") and Path(req["_model_source"]).exists():
                found.setdefault(ident, (req["_model_source"], job["created_at"]))
            if job["status"] == "succeeded" and job["fine_tuned_model"]:
                found[job["fine_tuned_model"]] = (job["run_dir"], job["finished_at"] or job["created_at"])
        for name, source in self.extra_sources().items():
            found.setdefault(name, source)
        return found

    def names(self) -> list[str]:
        return list(self.sources())

    async def target(self, name: str) -> Optional[Target]:
        if name in self.loaded:
            self.loaded.move_to_end(name)
            self.used[name] = time.monotonic()
            return self.loaded[name]
        sources = await asyncio.to_thread(self.sources)
        source = sources.get(name)
        if source is None and self.models_dirs:  # a model asked for by its path in a --models folder
            found = model_in_folders(name, self.models_dirs)
            if found:
                name, source = found[1], sources.get(found[1])
                if name in self.loaded:
                    return self.loaded[name]
        if source is None:
            return None
        return await asyncio.to_thread(self._load, name, source[0])

    def _load(self, name: str, source: str) -> Target:
        with self.loading:  # one load at a time; a second request for the same model waits for the first
            if name in self.loaded:
                return self.loaded[name]
            self._evict(room_for=1)
            if len(self.loaded) >= self.max_loaded:
                raise HTTPException(429, f"all {self.max_loaded} model slots are busy generating; retry shortly",
                                    headers={"Retry-After": "5"})
            served = load_served([source], merge=True, log=lambda m: None, max_rows=self.max_rows,
                                 max_waiting=self.max_waiting)
            model = next(iter(served.models.values()))
            model.name = name
            served.engine.start()
            self.loaded[name] = Target(served.engine, served.tokenizer, model, served.context)
            self.used[name] = time.monotonic()
            return self.loaded[name]

    def _evict(self, room_for: int = 0) -> None:
        """Free the least recently used idle models until `room_for` more fit within max_loaded."""
        for old in list(self.loaded):
            if len(self.loaded) + room_for <= self.max_loaded:
                return
            idle = time.monotonic() - self.used.get(old, 0) > IDLE_SECONDS
            if self.loaded[old].engine.pending() == 0 and idle:
                self.loaded.pop(old).engine.stop()

    def stop(self) -> None:
        for t in self.loaded.values():
            t.engine.stop()
        self.loaded.clear()


def created(pool: ModelPool) -> list[dict]:
    return [{"id": n, "object": "model", "created": c, "owned_by": "tunesmith" if n.startswith("ft:") else "system"}
            for n, (_, c) in pool.sources().items()]

