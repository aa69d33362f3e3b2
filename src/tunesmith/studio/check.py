"""Checking an upload with bounded work: the data layer's `check_file` (every record read as training would read
it) run in a child process whose memory is capped, one check at a time.

A file's size on the wire says little about what reading it builds: a 621-byte Parquet file of dictionary-encoded,
zstd-compressed 1 MiB strings decodes to 48.8 GiB, and a JSONL line becomes several times its bytes in Python
objects. So the studio never decodes an upload itself:

  * line formats (.jsonl, .csv, .tsv, .txt) are first scanned here, streaming, for their longest line and their
    line count (`MAX_LINE_BYTES`, `MAX_ROWS`), holding one bounded chunk at a time;
  * then `python -m tunesmith.studio.check FILE NAME BUDGET` reads the file with the data layer, after lowering its
    own RLIMIT_DATA to what its imports use plus `BUDGET` bytes (decoded data of any format: Parquet, CSV, JSON,
    JSONL). Past it, an allocation fails in the child, never in the studio; Parquet's row count is read from the
    footer first and refused past `MAX_ROWS` before any row is decoded;
  * a wall-clock limit (`CHECK_SECONDS`) ends a check that takes too long.

Why a process and not a streaming reader: the data layer's readers are the truth of what training will accept,
and a memory limit bounds every one of them (and any future format) at once, without a second parser to keep in step.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.paths import child_env

MAX_LINE_BYTES = 8 << 20        # one record of a line format
MAX_ROWS = 5_000_000
CHECK_SECONDS = 600
LINE_SUFFIXES = (".jsonl", ".csv", ".tsv", ".txt")
_one_at_a_time = threading.Lock()


def check_upload(path: Path, shown: str, budget: int) -> tuple[str, int]:
    """(format, records) of an uploaded file, or TunesmithError with what is wrong (named as `shown`, no path)."""
    if path.suffix.lower() in LINE_SUFFIXES:
        _scan_lines(path, shown)
    with _one_at_a_time:
        try:
            done = subprocess.run([sys.executable, "-m", "tunesmith.studio.check", str(path), shown, str(budget)],
                                  capture_output=True, text=True, timeout=CHECK_SECONDS, env=child_env(),
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise TunesmithError(f"{shown}: checking it took longer than {CHECK_SECONDS} s; refused") from None
    last = (done.stdout.strip().splitlines() or [""])[-1]
    try:
        answer = json.loads(last)
    except ValueError:
        answer = {}
    if "format" in answer:
        return answer["format"], answer["records"]
    raise TunesmithError(answer.get("error") or f"{shown}: reading it needs more than the studio's limit of "
                         f"{budget >> 20} MiB of decoded data; refused")


def _scan_lines(path: Path, shown: str) -> None:
    lines, current = 0, 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            start = 0
            while (end := chunk.find(b"\n", start)) != -1:
                current += end - start
                if current > MAX_LINE_BYTES:
                    break
                lines, current, start = lines + 1, 0, end + 1
            else:
                current += len(chunk) - start
            if current > MAX_LINE_BYTES:
                raise TunesmithError(f"{shown}:{lines + 1}: a line longer than {MAX_LINE_BYTES >> 20} MiB; refused "
                                     f"(one record must fit in {MAX_LINE_BYTES >> 20} MiB)")
            if lines > MAX_ROWS:
                raise TunesmithError(f"{shown}: more than {MAX_ROWS} lines; refused")


def _vm_data() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmData:"):
            return int(line.split()[1]) << 10
    return 0


def main(argv: list[str]) -> int:
    path, shown, budget = Path(argv[0]), argv[1], int(argv[2])
    import resource

    import pyarrow.parquet as pq  # imported before the limit: its memory is not the file's

    from tunesmith.data.prepare import check_file

    if path.suffix.lower() == ".parquet":
        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception:
            rows = 0  # not readable as Parquet: check_file says what is wrong
        if rows > MAX_ROWS:
            print(json.dumps({"error": f"{shown}: {rows} rows, more than the studio's limit of {MAX_ROWS}; refused"}))
            return 0
    if sys.platform.startswith("linux"):
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        resource.setrlimit(resource.RLIMIT_DATA, (_vm_data() + budget, hard))
    try:
        fmt, records = check_file(path, shown)
    except TunesmithError as e:
        print(json.dumps({"error": str(e).replace(str(path), shown)}))
        return 0
    except MemoryError:
        return 3  # the caller words it
    print(json.dumps({"format": fmt, "records": records}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
