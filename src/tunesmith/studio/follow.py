"""Following a job's growing files (train.log, metrics.jsonl) across polls and studio restarts: which whole lines
are new since the last read. A file is followed by its identity and the bytes read, not by a count of lines, because
a resume rewrites metrics.jsonl (train/checkpoint.truncate_metrics writes a new file with the rows up to the
checkpoint's step) and trains the later steps again: the new file may be as long as the old one by the next poll.
Its first rows that are the old file's, byte for byte (by an 8-hex digest per row), were read; the rest are new, so a
step trained again is an event again, once. Own code: no library follows a rewritten JSONL file this way.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

DIGEST = 8  # hex characters of a line's digest (metrics.jsonl's lines read, in a job's offsets)


def _digest(line: bytes) -> str:
    return hashlib.blake2b(line, digest_size=DIGEST // 2).hexdigest()


def new_lines(path: Path, seen: dict, kind: str, rows: bool) -> tuple[list[str], dict]:
    """The whole lines of `path` not read yet, and `seen` with how far it is read now: seen[kind] is {"file": the
    file's identity, "at": the bytes read, "rows": a digest of each line read (with `rows`)}. The same file is read on
    from "at"; another file (a resume's rewrite: truncate_metrics replaces metrics.jsonl) or a shorter one from its
    start, skipping its first lines while they are the lines read before (with `rows`; without, a new file is new).
    A last line without its newline is left for the next call. A studio.db from before (seen[kind] a count of lines)
    goes on from that line of the file as it is."""
    state = seen.get(kind)
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            ident = f"{st.st_dev}:{st.st_ino}"
            if isinstance(state, int):  # lines read, as an older studio counted them
                state = _as_read(fh.read(), state, ident)
                fh.seek(0)
            state = state or {}
            same = state.get("file") == ident and st.st_size >= state.get("at", 0)
            fh.seek(state["at"] if same else 0)
            data = fh.read()
    except OSError:
        return [], seen
    end = data.rfind(b"\n") + 1
    lines = data[:end].split(b"\n")[:-1]
    digests = [_digest(line) for line in lines] if rows else []
    old = state.get("rows", "") if rows else ""
    skip = 0
    if rows and not same:
        while skip < len(lines) and old[skip * DIGEST:(skip + 1) * DIGEST] == digests[skip]:
            skip += 1
    now = {"file": ident, "at": (state.get("at", 0) if same else 0) + end}
    if rows:
        now["rows"] = (old if same else "") + "".join(digests)
    text = [line.decode("utf-8", errors="replace") for line in lines[skip:]]
    return [t for t in text if t.strip()], {**seen, kind: now}


def _as_read(data: bytes, count: int, ident: str) -> dict:
    """A line count of an older studio (its non-empty whole lines) as the bytes and digests of those lines."""
    at, n, digests = 0, 0, []
    while n < count and (end := data.find(b"\n", at)) >= 0:
        line = data[at:end]
        digests.append(_digest(line))
        n += bool(line.strip())
        at = end + 1
    return {"file": ident, "at": at, "rows": "".join(digests)}
