"""Tokenized-data cache: a second run on the same data, tokenizer and data settings skips
reading, validating, rendering and tokenizing.

Key = sha256 of (cache version, the `data:` settings, the effective max_length, the tokenizer's
vocabulary/special tokens/chat template, and path + size + mtime of every input file). Hub
datasets are not cached (nothing local to fingerprint). `$TUNESMITH_DATA_CACHE` moves it. The training split is stored as flat
token arrays (ids, labels, lengths) -- its examples and rendered text are not kept, nothing in
training needs them; the validation split is stored whole (it is small and evaluation reads its
prompts and references). Written atomically; an unreadable entry is ignored and rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import numpy as np

from tunesmith.config import DataConfig
from tunesmith.data.read import expand_paths
from tunesmith.data.render import PreparedData, Split, Tokenized
from tunesmith.paths import cache_root

VERSION = 3


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
    if path.startswith("builtin:"):
        from tunesmith.data.docstrings import cached_path

        path = str(cached_path())
    p = Path(path)
    paths = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    return [[str(q.resolve()), q.stat().st_size, q.stat().st_mtime_ns] for q in paths]


def load(key: str):
    """The cached PreparedData, or None."""
    d = cache_dir() / key
    try:
        arrays = np.load(d / "train.npz")
        with open(d / "rest.pkl", "rb") as f:
            rest = pickle.load(f)
    except (OSError, ValueError, EOFError, pickle.UnpicklingError, KeyError):
        shutil.rmtree(d, ignore_errors=True)  # damaged (or absent): rebuilt and saved again
        return None
    bounds = np.concatenate([[0], np.cumsum(arrays["lengths"])])
    ids, labels, truncated, classes = arrays["ids"], arrays["labels"], arrays["truncated"], arrays["classes"]
    tokens = [Tokenized(ids[a:b], labels[a:b], bool(t), None if c < 0 else int(c))
              for a, b, t, c in zip(bounds[:-1], bounds[1:], truncated, classes)]
    return PreparedData(rest["format"], Split([], [], tokens), rest["val"], {**rest["stats"], "from_cache": str(d)})


def save(key: str, data) -> None:
    """Best effort: a cache that cannot be written (read-only home, full disk) costs only time."""
    if data.train.tokens and data.train.tokens[0].rejected is not None:
        return  # preference pairs are not cached (yet): they are few and quick to tokenize
    root = cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
        toks = data.train.tokens
        np.savez(tmp / "train.npz", ids=np.concatenate([t.input_ids for t in toks]),
                 labels=np.concatenate([t.labels for t in toks]),
                 lengths=np.array([len(t.input_ids) for t in toks], dtype=np.int64),
                 truncated=np.array([t.truncated for t in toks], dtype=bool),
                 classes=np.array([-1 if t.label is None else t.label for t in toks], dtype=np.int64))
        with open(tmp / "rest.pkl", "wb") as f:
            pickle.dump({"format": data.format, "val": data.val, "stats": data.stats}, f)
        os.replace(tmp, root / key)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True) if "tmp" in locals() else None
