"""Tokenized-data cache: a second run on the same data, tokenizer and data settings skips
reading, validating, rendering and tokenizing.

Key = sha256 of (cache version, the `data:` settings, the effective max_length, the tokenizer's
vocabulary/special tokens/chat template, and path + size + mtime of every input file). Hub
datasets are not cached (nothing local to fingerprint). `$TUNESMITH_DATA_CACHE` moves it. The training split is stored as flat
token arrays (ids, labels, lengths) -- its examples and rendered text are not kept, nothing in
training needs them; the validation split is stored whole (it is small and evaluation reads its
prompts and references): its examples and rendered text as JSON, its tokens as arrays. Nothing is unpickled, so a
shared cache folder cannot run code in its users' training. Written atomically; an entry that cannot be read (torn,
truncated, from another version) is rebuilt with a warning.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import shutil
import tempfile
from pathlib import Path

import numpy as np

from tunesmith.config import DataConfig
from tunesmith.data.read import expand_paths
from tunesmith.data.render import PreparedData, Rendered, Split, Tokenized
from tunesmith.data.shapes import Example
from tunesmith.paths import cache_root

VERSION = 4  # 4: no pickle (val split as JSON + npz)


def cache_dir() -> Path:
    return Path(os.environ.get("TUNESMITH_DATA_CACHE") or cache_root() / "data")


def cache_key(cfg: DataConfig, tokenizer, max_length: int) -> str | None:
    files = []
    for spec in [cfg.path] + ([cfg.val_path] if cfg.val_path else []):
        for path in expand_paths(spec):
            if path.startswith("hub:"):
                return None
            files.extend(_file_stats(path))
    vocab = tokenizer.backend_tokenizer.to_str() if getattr(tokenizer, "backend_tokenizer", None) else repr(sorted(tokenizer.get_vocab().items()))
    h = hashlib.sha256()
    for part in (str(VERSION), cfg.model_dump_json(), str(max_length), hashlib.sha256(vocab.encode()).hexdigest(),
                 repr(getattr(tokenizer, "chat_template", None)), repr(tokenizer.eos_token), repr(tokenizer.bos_token),
                 json.dumps(files)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def _file_stats(path: str) -> list:
    if path.startswith(("builtin:arithmetic", "builtin:countdown")):  # generated from a seed: its version is its identity
        from tunesmith.data import arithmetic, countdown

        return [[path, (arithmetic if path.startswith("builtin:arithmetic") else countdown).VERSION]]
    if path.startswith("builtin:"):
        from tunesmith.data.docstrings import cached_path

        path = str(cached_path())
    p = Path(path)
    paths = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    return [[str(q.resolve()), q.stat().st_size, q.stat().st_mtime_ns] for q in paths]


def load(key: str):
    """The cached PreparedData, or None (absent, or damaged: then it is removed and rebuilt)."""
    d = cache_dir() / key
    if not d.exists():
        return None
    try:
        with np.load(d / "train.npz") as arrays:
            train = _tokens(arrays)
        with np.load(d / "val.npz") as arrays:
            val_tokens = _tokens(arrays)
        rest = json.loads((d / "rest.json").read_text(encoding="utf-8"))
        val = Split([Example(**e) for e in rest["val_examples"]],
                    [Rendered(r["text"], [tuple(x) for x in r["spans"]], r["prompt"], r["reference"]) for r in rest["val_rendered"]],
                    val_tokens)
        return PreparedData(rest["format"], Split([], [], train), val, {**rest["stats"], "from_cache": str(d)})
    except Exception as e:  # torn, truncated, another version's layout: rebuilt and saved again
        print(f"tunesmith: the tokenized-data cache entry {d} is damaged ({type(e).__name__}); rebuilding it", file=sys.stderr)
        shutil.rmtree(d, ignore_errors=True)
        return None


def save(key: str, data) -> None:
    """Best effort: a cache that cannot be written (read-only home, full disk) costs only time."""
    if data.train.tokens and data.train.tokens[0].rejected is not None:
        return  # preference pairs are not cached (yet): they are few and quick to tokenize
    root = cache_dir()
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
        np.savez(tmp / "train.npz", **_arrays(data.train.tokens))
        np.savez(tmp / "val.npz", **_arrays(data.val.tokens))
        rest = {"format": data.format, "stats": data.stats,
                "val_examples": [vars(e) for e in data.val.examples], "val_rendered": [vars(r) for r in data.val.rendered]}
        (tmp / "rest.json").write_text(json.dumps(rest), encoding="utf-8")
        os.replace(tmp, root / key)
    except (OSError, TypeError, ValueError):
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _arrays(toks: list[Tokenized]) -> dict:
    def flat(rows):
        return np.concatenate(rows) if rows else np.zeros(0, dtype=np.int32)

    return {"ids": flat([t.input_ids for t in toks]), "labels": flat([t.labels for t in toks]),
            "lengths": np.array([len(t.input_ids) for t in toks], dtype=np.int64),
            "truncated": np.array([t.truncated for t in toks], dtype=bool),
            "classes": np.array([-1 if t.label is None else t.label for t in toks], dtype=np.int64),
            "rejected_ids": flat([t.rejected.input_ids for t in toks if t.rejected is not None]),
            "rejected_labels": flat([t.rejected.labels for t in toks if t.rejected is not None]),
            "rejected_lengths": np.array([len(t.rejected.input_ids) if t.rejected is not None else -1 for t in toks], dtype=np.int64),
            "rejected_truncated": np.array([t.rejected is not None and t.rejected.truncated for t in toks], dtype=bool)}


def _tokens(arrays) -> list[Tokenized]:
    """The Tokenized list `_arrays` stored (read whole here, so a truncated file fails inside the caller's try)."""
    ids, labels, lengths = np.array(arrays["ids"]), np.array(arrays["labels"]), np.array(arrays["lengths"])
    truncated, classes = np.array(arrays["truncated"]), np.array(arrays["classes"])
    r_ids, r_labels, r_lengths = np.array(arrays["rejected_ids"]), np.array(arrays["rejected_labels"]), np.array(arrays["rejected_lengths"])
    r_truncated = np.array(arrays["rejected_truncated"])
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    r_bounds = np.concatenate([[0], np.cumsum(np.maximum(r_lengths, 0))])
    out = []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        rejected = None
        if r_lengths[i] >= 0:
            ra, rb = r_bounds[i], r_bounds[i + 1]
            rejected = Tokenized(r_ids[ra:rb], r_labels[ra:rb], bool(r_truncated[i]))
        c = int(classes[i])
        out.append(Tokenized(ids[a:b], labels[a:b], bool(truncated[i]), None if c < 0 else c, rejected))
    return out
