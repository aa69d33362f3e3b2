"""Read records from files, each tagged with where it came from (`file:line`) for error messages.

Supported: JSONL, JSON (an array of objects, or {"data"/"train": [...]}), CSV/TSV, Parquet,
plain text (`.txt`: one record per line; a file with blank-line-separated paragraphs or a
single document is read as paragraphs), a folder written by `datasets.save_to_disk`,
`builtin:docstrings` (data/docstrings.py), `builtin:arithmetic` / `builtin:arithmetic-test` (data/arithmetic.py),
`builtin:countdown` / `builtin:countdown-test` (data/countdown.py), and
`datasets:NAME/FILE`, a public data set in the data folder (data/sources.py).
"""
from __future__ import annotations

import csv
import glob
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

from tunesmith.data import sources
from tunesmith.errors import TunesmithError


@dataclass
class Record:
    fields: dict
    where: str  # "file:line" (or "file:row N" for columnar files)


def expand_paths(spec: Union[str, list[str]]) -> list[str]:
    specs = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for s in specs:
        if s.startswith("builtin:"):
            out.append(s)
            continue
        if s.startswith(sources.PREFIX):  # a public data set in the data folder (data/sources.py)
            out.append(str(sources.resolve(s)))
            continue
        p = Path(s).expanduser()
        if p.exists():
            out.append(str(p))
            continue
        matches = sorted(glob.glob(str(p), recursive=True))
        if matches:
            out.extend(matches)
        elif _looks_like_hub_id(s):
            out.append(f"hub:{s}")
        else:
            raise TunesmithError(f"data file {s!r} does not exist (and matches no files as a glob)")
    return out


def read_records(spec: Union[str, list[str]]) -> list[Record]:
    records: list[Record] = []
    for path in expand_paths(spec):
        got = list(_read_one(path))
        if not got:
            raise TunesmithError(f"{path}: no records (the file is empty)")
        records.extend(got)
    return records


def _read_one(path: str) -> Iterator[Record]:
    if path.startswith("builtin:"):
        name = path.split(":", 1)[1]
        if name in ("arithmetic", "arithmetic-test", "countdown", "countdown-test"):
            from tunesmith.data import arithmetic, countdown

            records = (arithmetic if name.startswith("arithmetic") else countdown).records
            yield from (Record(r, f"{path}:{i + 1}") for i, r in enumerate(records(name)))
            return
        if name != "docstrings":
            raise TunesmithError(f"unknown built-in dataset {path!r}; available: builtin:docstrings, builtin:arithmetic, "
                                 f"builtin:arithmetic-test, builtin:countdown, builtin:countdown-test")
        from tunesmith.data.docstrings import cached_path

        yield from _read_jsonl(cached_path(), shown="builtin:docstrings")
        return
    if path.startswith("hub:"):
        yield from _read_hub(path[4:])
        return
    p = Path(path)
    if p.is_dir():
        yield from _read_saved_dataset(p)
        return
    suffix = p.suffix.lower()
    from tunesmith.data.judgements import is_judgements_file, pair_records

    if is_judgements_file(p):  # a run's blind A/B judgements: its decided ones as preference pairs
        yield from (Record(fields, where) for fields, where in pair_records(p))
        return
    readers = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json, ".csv": _read_csv,
               ".tsv": _read_csv, ".parquet": _read_parquet, ".txt": _read_text, ".text": _read_text}
    if suffix not in readers:
        raise TunesmithError(f"{path}: unknown file type {suffix!r}; supported: {', '.join(readers)} or a save_to_disk folder")
    yield from readers[suffix](p)


def _open_text(p: Path):
    raw = p.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # tolerate a BOM
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise TunesmithError(f"{p}:{line}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); re-save the file as UTF-8") from None


def _json(text: str):
    """json.loads; NaN and Infinity are not JSON values a record may carry (a label "nan" would become a class)."""
    def no_constants(name):
        raise ValueError(f"{name} is not a JSON value")

    return json.loads(text, parse_constant=no_constants)


def _read_jsonl(p: Path, shown: str = "") -> Iterator[Record]:
    shown = shown or str(p)
    # split on "\n" only: str.splitlines() also breaks at U+2028 etc., which JSON strings may hold
    for n, line in enumerate(_open_text(p).split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = _json(line)
        except json.JSONDecodeError as e:
            raise TunesmithError(f"{shown}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        except (ValueError, RecursionError) as e:  # an integer of thousands of digits, nesting too deep, NaN
            raise TunesmithError(f"{shown}:{n}: not usable JSON ({str(e).split(';')[0] or type(e).__name__})") from None
        if not isinstance(obj, dict):
            raise TunesmithError(f"{shown}:{n}: expected a JSON object per line, got {type(obj).__name__}")
        yield Record(obj, f"{shown}:{n}")


def _read_json(p: Path) -> Iterator[Record]:
    text = _open_text(p)
    try:
        obj = _json(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines saved as .json
            yield from _read_jsonl(p)
            return
        raise TunesmithError(f"{p}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    except (ValueError, RecursionError) as e:
        raise TunesmithError(f"{p}: not usable JSON ({str(e).split(';')[0] or type(e).__name__})") from None
    if isinstance(obj, dict):
        for key in ("data", "train", "examples", "rows"):
            if isinstance(obj.get(key), list):
                obj = obj[key]
                break
    if not isinstance(obj, list):
        raise TunesmithError(f"{p}: expected a JSON array of records (or JSON Lines)")
    for i, item in enumerate(obj):
        if not isinstance(item, dict):
            raise TunesmithError(f"{p}: item {i} is {type(item).__name__}, expected an object")
        yield Record(item, f"{p}[{i}]")


def _read_csv(p: Path) -> Iterator[Record]:
    text = _open_text(p)
    delim = "\t" if p.suffix.lower() == ".tsv" else ","
    # rows end at line breaks only (str.splitlines also breaks at form feeds and U+2028, which cells may hold)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delim)
    if not reader.fieldnames:
        return
    for row in reader:
        line = reader.line_num
        if None in row:
            raise TunesmithError(f"{p}:{line}: more cells than the {len(reader.fieldnames)} header columns")
        yield Record({k: _cell(v) for k, v in row.items()}, f"{p}:{line}")


def _cell(v):
    return None if v is None or v == "" or v.strip().lower() == "nan" else v


def _read_parquet(p: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except Exception as e:
        raise TunesmithError(f"{p}: cannot read Parquet: {e}") from None
    for i, row in enumerate(table.to_pylist()):
        yield Record({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}, f"{p}:row {i + 1}")


def _read_text(p: Path) -> Iterator[Record]:
    text = _open_text(p).replace("\r\n", "\n")  # Windows line ends: no trailing \r on every record
    if "\n\n" in text.strip():  # paragraphs / documents separated by blank lines
        line = 1
        for block in text.split("\n\n"):
            if block.strip():
                yield Record({"text": block.strip("\n")}, f"{p}:{line}")
            line += block.count("\n") + 2
    else:
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                yield Record({"text": line}, f"{p}:{n}")


def _looks_like_hub_id(s: str) -> bool:
    """owner/name, and not a local path with a typo (its first folder exists here: mydata/trian is not a hub id)."""
    parts = s.split("/")
    return (len(parts) == 2 and all(parts) and not s.startswith((".", "~")) and "." not in parts[1][-8:]
            and not Path(parts[0]).exists())


def _read_hub(repo_id: str) -> Iterator[Record]:
    try:
        from datasets import load_dataset

        ds = load_dataset(repo_id, split="train")
    except Exception as e:
        raise TunesmithError(f"data {repo_id!r} is not a local file, and the hub could not provide it as a dataset "
                             f"({type(e).__name__}); download it elsewhere and pass the file or save_to_disk folder") from None
    for i, row in enumerate(ds):
        yield Record(dict(row), f"{repo_id}:row {i + 1}")


def _read_saved_dataset(p: Path) -> Iterator[Record]:
    try:
        from datasets import load_from_disk

        ds = load_from_disk(str(p))
    except Exception as e:
        raise TunesmithError(f"{p}: a folder, but not one written by datasets.save_to_disk ({type(e).__name__})") from None
    if hasattr(ds, "keys"):  # a DatasetDict: take the train split
        ds = ds["train"] if "train" in ds else ds[list(ds.keys())[0]]
    for i, row in enumerate(ds):
        yield Record(dict(row), f"{p}:row {i + 1}")
