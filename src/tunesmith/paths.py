"""Where tunesmith keeps what it builds once and reuses: `$TUNESMITH_CACHE`, default `~/.cache/tunesmith`
(de-quantized models, joined GGUFs, tokenized data, the docstring corpus, WordNet for METEOR); and how it starts
Python child processes (`child_env`)."""
from __future__ import annotations

import os
import sys
from pathlib import Path


def cache_root() -> Path:
    root = os.environ.get("TUNESMITH_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "tunesmith")
    return Path(root)


def child_env(env: dict | None = None) -> dict:
    """The environment for a `python -m tunesmith...` child process (the docstring builder, torchrun's workers,
    `compare`'s runs): PYTHONSAFEPATH (Python 3.11+), so the working folder is not put first on the child's sys.path and
    a `calendar.py` or `wandb.py` lying there is not imported in place of the real module."""
    env = dict(os.environ if env is None else env)
    if sys.version_info >= (3, 11):
        env["PYTHONSAFEPATH"] = "1"
    return env
