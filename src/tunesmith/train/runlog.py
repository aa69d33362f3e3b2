"""What a run writes as it goes: the log (terminal + train.log) and metrics.jsonl."""
from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from tunesmith.train.rundir import write_text_atomic


class RunLog:
    """Prints to the terminal and appends to runs/<name>/train.log (kept in memory until the run dir exists)."""

    def __init__(self, enabled: bool = True):
        self.fh, self.pending, self.enabled = None, [], enabled

    def attach(self, path: Path) -> None:
        self.fh = open(path, "a", encoding="utf-8")
        self.fh.writelines(line + "\n" for line in self.pending)
        self.fh.flush()

    def __call__(self, msg: str) -> None:
        if not self.enabled:
            return
        tqdm.write(msg)
        if self.fh is None:
            self.pending.append(msg)
            return
        self.fh.write(msg + "\n")
        self.fh.flush()


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """On resume: forget rows logged after the checkpoint (those steps run again)."""
    rows = read_metrics(path)
    if not rows and not path.exists():
        return
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= step))


def read_metrics(path: Path) -> list[dict]:
    """The rows of metrics.jsonl; a line torn by a crash mid-write is skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows
