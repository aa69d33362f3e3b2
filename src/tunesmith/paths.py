"""Where tunesmith keeps what it builds once and reuses: `$TUNESMITH_CACHE`, default `~/.cache/tunesmith`
(de-quantized models, joined GGUFs, tokenized data, the docstring corpus, WordNet for METEOR)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    root = os.environ.get("TUNESMITH_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "tunesmith")
    return Path(root)
