"""A job's events as server-sent events (an extension of OpenAI's API): replayed from the client's Last-Event-ID,
then followed as the scheduler writes them, at most `limit` streams open at once (bounded work: each is a task that
polls the store's version four times a second).
"""
from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass

from tunesmith.studio.protocol import event_object
from tunesmith.studio.store import TERMINAL, Store


@dataclass
class EventStreams:
    store: Store
    stopping: threading.Event    # set when the studio shuts down (Runner.stopping): every stream ends
    limit: int = 64
    open: int = 0

    @property
    def full(self) -> bool:
        return self.open >= self.limit

    async def follow(self, job_id: str, after: int, http):
        """Every event after `after` (SSE `id:` = the event's number, so a client reconnecting with Last-Event-ID gets
        what it missed), then new ones as they come, until the job has ended and all of its events are sent, the
        client leaves, or the studio shuts down. The database is asked only when something was written
        (`store.version`)."""
        store = self.store
        self.open += 1
        try:
            quiet, version = 0.0, -1
            while not self.stopping.is_set():
                rows = []
                if store.version != version:
                    version = store.version
                    rows = store.events(job_id, after_seq=after, limit=500, newest_first=False)
                    for e in rows:
                        after = e["seq"]
                        yield f"id: {e['seq']}\nevent: {e['type']}\ndata: {json.dumps(event_object(job_id, e))}\n\n"
                    job = store.job(job_id)
                    if not rows and job["status"] in TERMINAL and not job["stop"]:  # ended, its process gone
                        yield f"event: end\ndata: {json.dumps({'status': job['status']})}\n\n"
                        return
                if rows:
                    quiet, version = 0.0, -1  # there may be more than one page
                    continue
                await asyncio.sleep(0.25)
                quiet += 0.25
                if quiet >= 15:  # a comment keeps proxies from closing an idle stream
                    quiet = 0.0
                    yield ": keep-alive\n\n"
                if await http.is_disconnected():
                    return
        finally:
            self.open -= 1
