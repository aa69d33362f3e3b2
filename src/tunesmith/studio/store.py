"""The studio's records: files, jobs and job events in one SQLite database under the studio home (`studio.db`).

SQLite because the records must survive a restart and be written by the server's threads at once (WAL mode, one
connection behind a lock: a few writes a second at most). The run folders stay the truth for metrics and weights;
a job's row says which run is its own, what was asked, and where it stands.
"""
from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Optional

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL, status TEXT NOT NULL, status_details TEXT, stored TEXT NOT NULL,
    format TEXT, records INTEGER, deleted INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, created_at INTEGER NOT NULL,
    request TEXT NOT NULL, status TEXT NOT NULL, finished_at INTEGER, fine_tuned_model TEXT,
    error TEXT, trained_tokens INTEGER, result_files TEXT NOT NULL DEFAULT '[]', run_dir TEXT NOT NULL,
    stop TEXT);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL, seq INTEGER NOT NULL, created_at INTEGER NOT NULL, level TEXT NOT NULL,
    type TEXT NOT NULL, message TEXT NOT NULL, data TEXT, PRIMARY KEY (job_id, seq));
"""

TERMINAL = ("succeeded", "failed", "cancelled")


class Store:
    def __init__(self, path: Path):
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)
        if "offsets" not in {r[1] for r in self.db.execute("PRAGMA table_info(jobs)")}:  # a studio.db from before
            self.db.execute("ALTER TABLE jobs ADD COLUMN offsets TEXT")
        self.lock = threading.RLock()
        self.version = 0  # bumped by every write: an event stream queries only when it moved

    @contextlib.contextmanager
    def transaction(self):
        """Writes that belong together: all of them or none (BEGIN IMMEDIATE ... COMMIT, one lock held)."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def _all(self, sql: str, args=()) -> list[dict]:
        with self.lock:
            return [dict(r) for r in self.db.execute(sql, args).fetchall()]

    def _one(self, sql: str, args=()) -> Optional[dict]:
        rows = self._all(sql, args)
        return rows[0] if rows else None

    def _run(self, sql: str, args=()) -> None:
        with self.lock:
            self.db.execute(sql, args)
            self.version += 1

    # files
    def add_file(self, row: dict) -> None:
        keys = ", ".join(row)
        self._run(f"INSERT INTO files ({keys}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))

    def file(self, file_id: str) -> Optional[dict]:
        return self._one("SELECT * FROM files WHERE id = ? AND deleted = 0", (file_id,))

    def files(self, purpose: Optional[str] = None) -> list[dict]:
        if purpose:
            return self._all("SELECT * FROM files WHERE deleted = 0 AND purpose = ? ORDER BY created_at DESC, id", (purpose,))
        return self._all("SELECT * FROM files WHERE deleted = 0 ORDER BY created_at DESC, id")

    def delete_file(self, file_id: str) -> None:
        self._run("UPDATE files SET deleted = 1 WHERE id = ?", (file_id,))

    # jobs
    def add_job(self, job_id: str, request: dict, run_dir: str, status: str) -> None:
        self._run("INSERT INTO jobs (id, created_at, request, status, run_dir) VALUES (?, ?, ?, ?, ?)",
                  (job_id, int(time.time()), json.dumps(request), status, run_dir))

    def job(self, job_id: str) -> Optional[dict]:
        return self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))

    def jobs(self, after: Optional[str] = None, limit: int = 20, statuses: tuple[str, ...] = ()) -> list[dict]:
        """Newest first; `after` a job id: the jobs created before it."""
        where, args = [], []
        if after:
            where.append("seq < (SELECT seq FROM jobs WHERE id = ?)")
            args.append(after)
        if statuses:
            where.append(f"status IN ({', '.join('?' * len(statuses))})")
            args.extend(statuses)
        sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY seq DESC LIMIT ?"
        return self._all(sql, (*args, limit))

    def oldest(self, status: str) -> list[dict]:
        return self._all("SELECT * FROM jobs WHERE status = ? ORDER BY seq", (status,))

    def update_job(self, job_id: str, **fields) -> None:
        sets = ", ".join(f"{k} = ?" for k in fields)
        self._run(f"UPDATE jobs SET {sets} WHERE id = ?", (*fields.values(), job_id))

    # events
    def add_event(self, job_id: str, message: str, level: str = "info", type: str = "message",
                  data: Optional[dict] = None) -> int:
        with self.lock:
            seq = self.db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE job_id = ?", (job_id,)).fetchone()[0]
            self.db.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (job_id, seq, int(time.time()), level, type, message, json.dumps(data) if data else None))
            self.version += 1
        return seq

    def offsets(self, job_id: str) -> Optional[dict]:
        """How far the job's run files have been read into events (follow.new_lines: per file its identity, the bytes
        read, digests of metrics.jsonl's lines), as last committed."""
        row = self._one("SELECT offsets FROM jobs WHERE id = ?", (job_id,))
        return json.loads(row["offsets"]) if row and row["offsets"] else None

    def events(self, job_id: str, after_seq: Optional[int] = None, before_seq: Optional[int] = None,
               limit: int = 20, newest_first: bool = True) -> list[dict]:
        where, args = ["job_id = ?"], [job_id]
        if after_seq is not None:
            where.append("seq > ?")
            args.append(after_seq)
        if before_seq is not None:
            where.append("seq < ?")
            args.append(before_seq)
        order = "DESC" if newest_first else "ASC"
        return self._all(f"SELECT * FROM events WHERE {' AND '.join(where)} ORDER BY seq {order} LIMIT ?", (*args, limit))

    def close(self) -> None:
        with self.lock:
            self.db.close()
