"""What a run says as it goes: the log (terminal + train.log) and progress bars."""
from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm


def progress_bar(total: int, desc: str | None, unit: str, disable: bool = False, initial: int = 0) -> tqdm:
    """A tqdm bar on stderr: redrawn every second on a terminal, a line every 30 s when stderr is a log file."""
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, disable=disable,
                mininterval=1.0 if sys.stderr.isatty() else 30.0)


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
