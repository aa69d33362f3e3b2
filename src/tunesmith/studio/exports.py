"""A finished run exported from the page: `tunesmith export RUN --format F` as a subprocess (the CLI's own command,
so a crash in a converter never takes the server down), one at a time (each may take minutes and a model's size in
memory), and the export folder packed as a zip to download. Messages name the run, never its server path.
"""
from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.paths import child_env
from tunesmith.run import RunDir


class ExportFailed(Exception):
    pass


@dataclass
class Exporter:
    timeout_s: int = 3600
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def busy(self) -> bool:
        return self.lock.locked()

    async def export(self, name: str, run: RunDir, fmt: str) -> dict:
        """Run the export; what it printed (its last lines), the files it made and where to download them.
        Raises ExportFailed with the CLI's error line."""
        cmd = [sys.executable, "-m", "tunesmith.cli.main", "export", str(run.path), "--format", fmt, "--overwrite"]
        async with self.lock:
            done = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=self.timeout_s,
                                           env=child_env())
        lines = (done.stdout + done.stderr).strip().splitlines()
        if done.returncode != 0:
            message = next((ln[7:] for ln in reversed(lines) if ln.startswith("error: ")), lines[-1] if lines else "failed")
            raise ExportFailed(message.replace(str(run.path), name))
        folder = run.exports / fmt
        return {"format": fmt, "output": [ln.replace(str(run.path), name) for ln in lines[-12:]],
                "files": sorted(p.name for p in folder.iterdir()) if folder.is_dir() else [],
                "download": f"/v1/studio/runs/{name}/export/{fmt}.zip"}


def zip_folder(folder: Path, prefix: str) -> bytes:
    """The folder's files (not hidden ones) as an uncompressed zip, each under `prefix/` (blocking)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file() and not p.name.startswith("."):
                z.write(p, f"{prefix}/{p.relative_to(folder)}")
    return buf.getvalue()
