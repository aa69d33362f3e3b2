"""One writer per run: training, resuming, replacing (`--overwrite`) and completing a run's evaluation hold an exclusive
lock on its folder for as long as they write there; a second process is refused with a message naming the holder.

The lock is `fcntl.flock` on `runs/NAME/.lock` (what SQLite and huggingface_hub's filelock do): the kernel releases it
when the holder exits, however it exits (kill -9 included), so a stale lock never blocks a resume. The file also says
who holds it (pid, host, what, since when) for the message. Where `fcntl` does not exist (Windows) runs are not locked.

`holder()` (the studio asks it for every run it lists) can only find out by taking the lock for an instant, so a
writer that starts at that instant, or a second probe, finds it taken: both try again for a short while
(`PROBE_GRACE_S`) before saying "in use" -- a probe holds it for microseconds, a writer for its whole run. (A read-only
test does not exist portably: Linux's F_OFD_GETLK does not see flock locks, and /proc/locks is Linux-only.)
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from tunesmith.errors import TunesmithError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_FILE = ".lock"
PROBE_GRACE_S = 0.25  # how long a lock that is taken is tried again before it counts as held by a writer


class RunLock:
    """Held from `acquire` until `release` (or the process ends)."""

    def __init__(self, folder: Path):
        self.folder, self.fh = Path(folder), None

    @property
    def path(self) -> Path:
        return self.folder / LOCK_FILE

    def acquire(self, what: str) -> "RunLock":
        if fcntl is None:
            return self
        fh = open(self.path, "a+", encoding="utf-8")
        if not _try_lock(fh, PROBE_GRACE_S):
            fh.seek(0)
            holder = _describe(fh.read())
            fh.close()
            raise TunesmithError(f"{self.folder} is in use: {holder}; wait for it to finish, or stop it first "
                                 f"(a run has one writer at a time)") from None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                             "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        fh.flush()
        self.fh = fh
        return self

    def release(self) -> None:
        if self.fh is not None:
            self.fh.close()  # closing the descriptor releases the flock
            self.fh = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False


def holder(folder: Path) -> str | None:
    """Who holds the lock on `folder` now, or None when nobody does (the studio shows live runs by this)."""
    if fcntl is None or not (Path(folder) / LOCK_FILE).exists():
        return None
    with open(Path(folder) / LOCK_FILE, "a+", encoding="utf-8") as fh:
        if not _try_lock(fh, 0.02):  # another probe may hold it for an instant
            fh.seek(0)
            return _describe(fh.read())
        fcntl.flock(fh, fcntl.LOCK_UN)
        return None


def _try_lock(fh, grace_s: float) -> bool:
    """Take the flock on `fh`, trying again for `grace_s` while it is taken; False when it stayed taken."""
    deadline = time.monotonic() + grace_s
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)


def _describe(text: str) -> str:
    try:
        h = json.loads(text)
        return f"{h['what']} by process {h['pid']} on {h['host']} since {h['since']}"
    except (ValueError, KeyError, TypeError):
        return "another process holds its lock"
