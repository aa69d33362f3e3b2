"""The studio's models: each finished job's `fine_tuned_model` and the base models answer the OpenAI generation
endpoints through the serving path of `tunesmith serve` (export/serve.py: its engine, limits and errors).

A model is loaded when a request first names it (in a worker thread: the server keeps answering meanwhile), merged
when it is an adapter (one model per engine is the fast case), and kept; past `max_loaded` models the one used least
recently and with nothing generating is stopped and freed. A job that finishes adds its model to the list at once.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Optional

from tunesmith.export.serve import Target, load_served
from tunesmith.models.load import BUNDLED
from tunesmith.studio.store import Store


def installed_bundled() -> list[str]:
    """The bundled base models whose weights packages are installed (only those can be fine-tuned or served)."""
    return [name for name, spec in BUNDLED.items()
            if all(importlib.util.find_spec(pkg) is not None for pkg in (spec.package, *spec.parts))]


class ModelPool:
    def __init__(self, store: Store, limits, max_loaded: int = 2, max_rows: int = 32, max_waiting: int = 256):
        self.store, self.limits, self.max_loaded = store, limits, max(1, max_loaded)
        self.max_rows, self.max_waiting = max_rows, max_waiting
        self.loaded: "OrderedDict[str, Target]" = OrderedDict()
        self.loading = threading.Lock()
        self.extra_sources = lambda: {}  # more models by id (the web page adds the runs started from the CLI)

    def sources(self) -> dict[str, tuple[str, int]]:
        """Model id -> (what to load, created): the installed bundled bases, the bases jobs named, finished jobs."""
        found = {name: (name, 0) for name in installed_bundled()}
        for job in self.store.jobs(limit=10_000):
            req = json.loads(job["request"])
            if not req["model"].startswith("ft:") and Path(req["_model_source"]).exists():
                found.setdefault(req["model"], (req["_model_source"], job["created_at"]))
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
            return self.loaded[name]
        source = self.sources().get(name)
        if source is None:
            return None
        return await asyncio.to_thread(self._load, name, source[0])

    def _load(self, name: str, source: str) -> Target:
        with self.loading:  # one load at a time; a second request for the same model waits for the first
            if name in self.loaded:
                return self.loaded[name]
            served = load_served([source], merge=True, log=lambda m: None, max_rows=self.max_rows,
                                 max_waiting=self.max_waiting)
            model = next(iter(served.models.values()))
            model.name = name
            served.engine.start()
            self.loaded[name] = Target(served.engine, served.tokenizer, model, served.context)
            self._evict()
            return self.loaded[name]

    def _evict(self) -> None:
        for old in list(self.loaded)[:-1]:
            if len(self.loaded) <= self.max_loaded:
                return
            if self.loaded[old].engine.pending() == 0:
                self.loaded.pop(old).engine.stop()

    def stop(self) -> None:
        for t in self.loaded.values():
            t.engine.stop()
        self.loaded.clear()


def created(pool: ModelPool) -> list[dict]:
    return [{"id": n, "object": "model", "created": c, "owned_by": "tunesmith" if n.startswith("ft:") else "system"}
            for n, (_, c) in pool.sources().items()]

