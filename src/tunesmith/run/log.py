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


_CONTROL = {c for c in range(32) if chr(c) not in "\n\t"} | {127} | set(range(0x80, 0xA0))


def printable(text: str, keep_colors: bool = False) -> str:
    """Data and model text for a terminal: control characters (an ESC starting a terminal sequence in a dataset or
    a model's output) shown as escapes, not obeyed; `keep_colors` keeps our own SGR colour codes (data inspect)."""
    import re

    if keep_colors:
        parts = re.split(r"(\x1b\[[0-9;]*m)", text)
        return "".join(p if i % 2 else printable(p) for i, p in enumerate(parts))
    return "".join(c if ord(c) not in _CONTROL else f"\\x{ord(c):02x}" for c in text)
