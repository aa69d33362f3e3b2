"""`tunesmith compare`: the same recipe once per method, same data and steps, side by side.

Each method trains in its own process (so its peak memory is its own, measured by the OS), into
`<out>/<method>/`. The table has the task metric, the held-out loss, trainable parameters, the size
of what is saved, wall time, real tokens/s and peak memory; written as table.md, table.csv and
chart.png in `<out>`.
"""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tunesmith.catalog import CAUSAL_SHOWS, describe_task
from tunesmith.errors import TunesmithError
from tunesmith.paths import child_env
from tunesmith.evaluate.side_by_side import mean_score
from tunesmith.run import RunDir
from tunesmith.run.files import write_text_atomic

COLUMNS = ["method", "weights", "task metric", "held-out loss", "trainable params", "saved MB", "wall s", "tok/s", "peak RSS GB"]


def rebuild(out: Path) -> list[dict]:
    """Re-tabulate a finished comparison from its runs (wall time and peak memory from table.csv)."""
    measured = {r["method"]: r for r in csv.DictReader(io.StringIO((out / "table.csv").read_text()))}
    rows = [_row(m, out / m, float(r["wall s"]), float(r["peak RSS GB"]) * 2 ** 30) if not r.get("error") else
            {"method": m, "error": r["error"]} for m, r in measured.items()]
    write_text_atomic(out / "table.md", to_markdown(rows))
    write_text_atomic(out / "table.csv", to_csv(rows))
    _chart(rows, out / "chart.png")
    return rows


def compare(config: str | None, overrides: list[str], methods: list[str], out: Path, log=print) -> list[dict]:
    if out.exists() and any(out.iterdir()):
        raise TunesmithError(f"{out} already exists; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in methods:
        log(f"== {method}")
        args = [sys.executable, "-m", "tunesmith.cli.main", "train", *([config] if config else []), *overrides,
                f"method.name={method}", f"output.dir={out}", f"output.name={method}"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=child_env())
        err = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        if status != 0:
            reason = (err.strip().splitlines() or ["failed"])[-1]
            log(f"{method} failed: {reason}")
            rows.append({"method": method, "error": reason})
            continue
        rows.append(_row(method, out / method, wall, usage.ru_maxrss * 1024))
    write_text_atomic(out / "table.md", to_markdown(rows))
    write_text_atomic(out / "table.csv", to_csv(rows))
    _chart(rows, out / "chart.png")
    return rows


def _row(method: str, run_dir: Path, wall: float, peak: float) -> dict:
    run = RunDir(run_dir)
    s = json.loads(run.summary.read_text())
    before, after = s.get("before") or {}, s.get("after") or {}
    shows = describe_task(s.get("task", "causal")) or CAUSAL_SHOWS
    if shows.compare_headline and after.get(shows.headline) is not None:  # as the task declares it (catalog.py)
        scale = 100 if shows.percent else 1
        metric, base = scale * after[shows.headline], before.get(shows.headline, shows.verdict.before_default)
        base = None if base is None else scale * base
    elif s.get("side_by_side"):
        metric, base = mean_score(s["side_by_side"], "tuned"), mean_score(s["side_by_side"], "base")
    else:
        metric = base = None
    weights = s.get("dtype")  # and ", bfloat16 matmuls" under train.mixed_precision
    if weights and s.get("mixed_precision"):
        weights += ", bfloat16 matmuls"
    return {"method": method, "weights": weights, "task metric": metric, "base metric": base,
            "held-out loss": (s.get("after") or {}).get("eval_loss"), "base loss": (s.get("before") or {}).get("eval_loss"),
            "trainable params": s["params"]["trainable"], "saved MB": _size(run.final) / 1e6, "wall s": wall,
            "tok/s": s["tok_s"], "peak RSS GB": peak / 2 ** 30, "task": s.get("task")}


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and "tokenizer" not in p.name)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def to_markdown(rows: list[dict]) -> str:
    base = next((r for r in rows if "base loss" in r), None)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    if base:
        untrained = {"method": "untrained base", "task metric": base["base metric"], "held-out loss": base["base loss"],
                     "trainable params": 0}
        lines.append("| " + " | ".join(_fmt(untrained.get(c)) for c in COLUMNS) + " |")
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} |" + " |" * (len(COLUMNS) - 2))
        else:
            lines.append("| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |")
    return "\n".join(lines) + f"\n\ntask metric: {_metric_kind(rows)}.\n"


def _metric_kind(rows: list[dict]) -> str:
    """What the task metric column is (one recipe, so one task for every row), as the task declares it."""
    task = next((r["task"] for r in rows if r.get("task")), None)
    return (describe_task(task) or CAUSAL_SHOWS).compare_kind


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS + ["base metric", "base loss", "error"], extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    if not ok:
        return
    shows = describe_task(next((r["task"] for r in ok if r.get("task")), "causal")) or CAUSAL_SHOWS
    direction = "higher" if not shows.compare_headline or shows.higher_is_better else "lower"  # ROUGE-L: higher
    panels = [("held-out loss", "held-out loss (lower is better)"), ("task metric", f"task metric ({direction} is better)"),
              ("tok/s", "real tokens / s"), ("peak RSS GB", "peak memory, GB")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    names = [r["method"] for r in ok]
    for ax, (key, title) in zip(axes, panels):
        ax.barh(names, [r.get(key) or 0 for r in ok], color="#4c72b0")
        if key == "held-out loss" and ok[0].get("base loss"):
            ax.axvline(ok[0]["base loss"], color="#c44e52", linestyle="--", label="untrained base")
            ax.legend(fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.invert_yaxis()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
