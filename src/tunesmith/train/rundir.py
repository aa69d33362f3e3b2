"""The run directory: created once, never overwritten without being asked; files written atomically."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from datetime import datetime
from pathlib import Path

from tunesmith.errors import TunesmithError


def choose_run_dir(parent: str, name: str | None, recipe: str, overwrite: bool) -> Path:
    """Pick the run directory and refuse an existing one early (nothing is created or deleted yet)."""
    path = Path(parent) / (name or f"{recipe}-{datetime.now():%Y%m%d-%H%M%S}")
    if path.exists() and not overwrite:
        raise TunesmithError(f"run directory {path} already exists; choose another output.name, or pass --overwrite to replace it")
    return path


def create_run_dir(path: Path, overwrite: bool) -> Path:
    """Create it once the inputs are known to be good, so a bad config or data file leaves nothing behind."""
    if path.exists():
        if not overwrite:
            raise TunesmithError(f"run directory {path} already exists; choose another output.name, or pass --overwrite to replace it")
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def publish_dir(final: Path, writer) -> None:
    """Call writer(tmp_dir), then rename tmp_dir to `final` (replacing an older copy only after success)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the published folder gets normal permissions
    try:
        writer(tmp)
        fsync_tree(tmp)
        old = final.with_name(f".{final.name}.old")
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fsync_tree(folder: Path) -> None:
    """Flush every file in `folder` to disk, so a rename after it never publishes a torn file."""
    for p in folder.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
