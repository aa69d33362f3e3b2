"""Uploaded data files: an upload is copied into `HOME/files/<file id><suffix>` and read at once by the data layer, as
training would read it (check.py), so its status is `processed` or `error` with the file's line and field. A client's
file name is shown, never used as a path. A file a job still needs (not ended, or resumable) is not deleted.

`upload` raises `FileRefused(status, message, code)` for what the route answers as an error; everything else it
returns is the stored row (protocol.file_object shapes it).
"""
from __future__ import annotations

import errno
import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tunesmith.errors import TunesmithError
from tunesmith.studio.check import check_upload
from tunesmith.studio.jobs import Policy, Runner, new_id, public_text, resumable
from tunesmith.studio.store import TERMINAL, Store

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")


class FileRefused(Exception):
    def __init__(self, status: int, message: str, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.code = status, code


@dataclass
class Files:
    store: Store
    home: Path
    policy: Policy
    max_file_bytes: int
    max_check_bytes: int

    def path(self, row: dict) -> Path:
        return self.home / "files" / row["stored"]

    def upload(self, src, client_name: Optional[str], purpose: str = "fine-tune") -> dict:
        """Store and check one upload (`src`: the spooled file); its row. Blocking: run it off the event loop."""
        filename = display_name(client_name or "upload")
        suffix = Path(filename).suffix.lower()
        if suffix not in FILE_SUFFIXES:
            raise FileRefused(400, f"{filename}: unsupported file type {suffix or '(none)'!r}; supported: "
                                   f"{', '.join(FILE_SUFFIXES)}")
        file_id = new_id("file")
        stored = self.home / "files" / f"{file_id}{suffix}"
        try:
            size = save_upload(src, stored)  # spooled by Starlette; copied, not held
        except OSError as e:
            stored.with_name(stored.name + ".part").unlink(missing_ok=True)
            if e.errno == errno.ENOSPC:
                raise FileRefused(507, f"{filename}: the studio's disk is full; free space and upload it again",
                                  "insufficient_storage")
            raise
        if size > self.max_file_bytes:
            stored.unlink(missing_ok=True)
            raise FileRefused(413, f"{filename}: larger than the studio's limit of {self.max_file_bytes} bytes")
        try:
            fmt, records = check_upload(stored, filename, self.max_check_bytes)
            status, details = "processed", None
        except TunesmithError as e:
            fmt, records, status, details = None, None, "error", public_text(str(e), self.home, self.policy)
        self.store.add_file({"id": file_id, "filename": filename, "purpose": purpose, "bytes": size,
                             "created_at": int(time.time()), "status": status, "status_details": details,
                             "stored": stored.name, "format": fmt, "records": records})
        return self.store.file(file_id)

    def user(self, file_id: str, runner: Runner) -> Optional[str]:
        """A job that still needs the file (it has not ended, or can be resumed), or None."""
        for j in self.store.jobs(limit=10_000):
            req = json.loads(j["request"])
            if file_id in (req.get("training_file"), req.get("validation_file")) and (
                    j["status"] not in TERMINAL or resumable(j, runner.run_dir(j["id"]))):
                return j["id"]
        return None

    def delete(self, row: dict) -> None:
        self.store.delete_file(row["id"])
        self.path(row).unlink(missing_ok=True)


def display_name(name: str) -> str:
    """What a client called its file, for display only: the last path part, printable, at most 200 characters."""
    name = re.split(r"[\\/]", name)[-1]
    name = "".join(c for c in name if c.isprintable()).strip() or "upload"
    return name[-200:]


def save_upload(src, stored: Path) -> int:
    """Copy an upload's spooled file into the studio's files folder; its size in bytes."""
    src.seek(0)
    tmp = stored.with_name(stored.name + ".part")
    with open(tmp, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
    size = tmp.stat().st_size
    tmp.replace(stored)
    return size
