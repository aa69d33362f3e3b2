"""bench/gpu.py cannot rot: its --dry-run runs every section's code on the CPU with tiny models (a minute of CPU time,
mostly imports), and the table it writes has every row with numbers or a stated reason."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU = ROOT / "bench" / "gpu.py"
TRAINING = ("lora", "full", "qlora", "dpo")


def run(tmp_path, *args: str) -> tuple[dict, str]:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("OUT", None)
    done = subprocess.run([sys.executable, str(GPU), "--dry-run", "--out", str(tmp_path / "out"), *args],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp_path / "out" / "gpu-bench.json").read_text()), (tmp_path / "out" / "gpu-bench.md").read_text()


def table_rows(md: str) -> list[list[str]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| section")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def test_dry_run_fills_every_row(tmp_path):
    result, md = run(tmp_path, "--work", str(tmp_path / "work"))
    sections = {s["key"]: s for s in result["sections"]}
    kinds = {k.split(":")[0] for k in sections}
    assert kinds == {"peak", "models", "lora", "full", "qlora", "dpo", "grpo", "generate", "fsdp"}
    failed = {k: s["error"] for k, s in sections.items() if s.get("error")}
    assert not failed
    assert result["imports"] == "all import" and sections["peak"]["tflops"] > 0
    rows = table_rows(md)
    for key, s in sections.items():
        kind = key.split(":")[0]
        if kind in ("peak", "models"):
            continue
        for row in s.get("rows") or [s]:
            assert row.get("skip") or row["tok_s"] > 0, (key, row)
        if s.get("skip"):  # a skip names its reason (QLoRA without bitsandbytes' kernels)
            assert len(s["skip"]) > 10
            continue
        if kind in TRAINING:
            assert s["peak_mib"] > 0 and s["flops"] > 0 and s["seconds"] > 0
        if kind in ("lora", "full"):  # the memorisation set: the training loss falls, and the rows are then measured
            assert s["loss_last"] < s["loss_first"], (key, s)
            assert 0 < s["mem_loss"] < 20
    # one table row per training or generation run, each with a number in its tokens/s cell or a skip
    expected = sum(len(s.get("rows") or [s]) for k, s in sections.items() if k.split(":")[0] not in ("peak", "models"))
    assert len(rows) == expected
    for cells in rows:
        assert cells[3].replace(",", "").replace(".", "").isdigit() or cells[-1].startswith("skipped:"), cells
    assert "x tutorial" in md and "matmul peak measured in this run" in md
    generate = sections[next(k for k in sections if k.startswith("generate"))]["rows"]
    assert generate[1]["note"].endswith(f"{len(generate)}/{len(generate)}") or "equal to model.generate's" in generate[1]["note"]


def test_budget_skips_with_the_reason(tmp_path):
    """A budget that is spent skips every section, each saying so (the parent alone: nothing is imported or trained)."""
    result, md = run(tmp_path, "--budget-s", "0")
    assert all(s["skip"].startswith("time budget") for s in result["sections"])
    assert sum(1 for cells in table_rows(md) if "skipped: time budget" in cells[-1]) == len(result["sections"])


def test_gpu_groups_pair_each_comparison():
    sys.path.insert(0, str(GPU.parent))
    try:
        import gpu
    finally:
        sys.path.remove(str(GPU.parent))
    sections = gpu.plan(gpu.GPU_SCALE)
    groups = gpu.groups_of(sections, dry=False)
    assert [s.key for s in groups[0]] == ["peak", "models"]
    pairs = [g for g in groups if len(g) == 2 and g[0].kind != "peak"]
    assert all(g[0].impl == "tunesmith" and g[1].impl in ("tutorial", "trl") and g[0].size == g[1].size for g in pairs)
    assert {g[0].kind for g in pairs} == {"lora", "full", "qlora", "dpo", "grpo"}
    assert sum(len(g) for g in groups) == len(sections) and len({s.key for s in sections}) == len(sections)
    assert len(gpu.groups_of(sections, dry=True)) == 1
