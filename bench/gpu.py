"""GPU benchmark: tunesmith against the HF Trainer + PEFT tutorial recipe (TRL for DPO and GRPO) on one GPU, in one go.

On randomly initialised models of real architectures (Qwen2.5-0.5B and Qwen2.5-1.5B shapes, written out below: speed
and memory do not need trained weights, and no weights travel), on a memorisation set built here (64 rows, trained
for 4 epochs, so the loss must fall), each tunesmith / baseline pair runs in a fresh process of its own (tunesmith
first) and is timed the same way as bench/run.py times the CPU benchmark:

  peak           bf16 matmul throughput measured in this run (8192^3), the denominator of every MFU
  lora           tunesmith LoRA (bf16 weights) vs the tutorial: AutoModelForCausalLM in bf16 + PEFT LoRA, Trainer(bf16)
  full           tunesmith full fine-tuning (fp32 weights, bf16 weight copies) vs the tutorial: fp32 weights, bf16 autocast
  qlora          tunesmith QLoRA vs the QLoRA tutorial (4-bit NF4 + double quant, prepare_model_for_kbit_training:
                 gradient checkpointing on, as that recipe has it); skipped with the reason when bitsandbytes' CUDA kernels
                 do not load
  dpo            tunesmith DPO (LoRA) vs TRL's DPOTrainer + PEFT (its defaults: reference log-probs every step with the
                 adapter switched off, gradient checkpointing on; tunesmith computes the reference log-probs once before
                 its loop, outside its timed loop)
  grpo           a few tunesmith GRPO steps (rollouts on its generation engine) vs TRL's GRPOTrainer + PEFT
                 (model.generate; gradient checkpointing on, its default), same prompts, group size, completion length
                 and reward
  generate       tunesmith's generation engine vs model.generate (left-padded batches of 16) on the same prompts,
                 greedy, 64 new tokens (bench/generate.py's functions)
  fsdp           `tunesmith train --nproc 1 train.distributed=fsdp` under torchrun on a tiny model (one process trains
                 as is: the torchrun launch path), plus tunesmith's FSDP2 sharding (train/distributed.py) on a
                 process group of one (NCCL on a GPU) checked against the unsharded model's loss and gradient

Columns: real tokens/s over the training loop (the first step included, as bench/run.py), the same after the first
WARM_STEPS steps, peak GPU memory (torch.cuda.max_memory_allocated during the section, above what it found allocated:
model, training, and for tunesmith its before/after evaluations), MFU = model FLOPs (tunesmith.train.plan.flops_per_token, as bench/run.py) /
loop seconds / the measured bf16 matmul peak, the training loss at the first and last step (tunesmith: response
tokens; the tutorial: every token, as its recipe trains), and the memorised rows' response loss after training,
measured by one function for both. Each section is guarded: a failure is recorded in the table and the script goes
on; `--budget-s` skips what would not finish in time.

Prepare here, once (downloads the wheels the GPU machine lacks, listed with the reasons in bench/gpu-wheels.txt, into
bench/wheels/, ignored by git: 15 wheels, 27 MiB, under the 64 MiB a device call may carry with the working tree):

    .venv/bin/python bench/gpu.py --fetch-wheels

Then one device tool call (the GPU machine has CUDA torch and most of the rest; the carried wheels are installed
offline into /tmp before the first section, and the table says which of the sections' modules fail to import):

    run(command="PYTHONUNBUFFERED=1 python3 bench/gpu.py --out $OUT --budget-s 450", carry=["bench/wheels"], timeout_s=540)

--budget-s 450 keeps the sections inside 7.5 minutes (a section group that would end later is skipped and says so),
leaving a 15-minute device allowance room for the machine's start and a partial rerun, e.g.
`python3 bench/gpu.py --out $OUT --only full,qlora --budget-s 200`. It prints one table and writes it to
$OUT/gpu-bench.md and $OUT/gpu-bench.json (device, versions, every section's raw numbers), and the sections' output to
$OUT/gpu-bench-logs.txt (all three come back from the device).

    .venv/bin/python bench/gpu.py --dry-run     # the same code paths on the CPU with tiny models (tests/test_bench_gpu.py)

--dry-run runs every section kind in one process on two tiny models of the same architecture (and a torchrun launch):
about a minute of CPU time on 2 cores, dominated by importing transformers, peft, trl and tunesmith.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WHEELS = HERE / "wheels"
WHEEL_LIST = HERE / "gpu-wheels.txt"
SITE = Path(tempfile.gettempdir()) / "tunesmith-gpu-site"
WARM_STEPS = 3        # steps left out of the steady-state tokens/s
MAX_LEN = 512

# Real architectures, random weights (config.json of Qwen/Qwen2.5-0.5B and -1.5B, the fields that shape compute).
QWEN25 = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=151936, tie_word_embeddings=True,
              max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6, hidden_act="silu",
              use_sliding_window=False, attention_dropout=0.0)
GPU_SIZES = {
    "qwen2.5-0.5b": {**QWEN25, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2},
    "qwen2.5-1.5b": {**QWEN25, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2},
}
# --dry-run: the same architecture, tiny (hidden 64: bitsandbytes' CPU 4-bit kernels need rows of one 64-value block);
# its vocabulary is larger than the tokenizer's, as Qwen's is.
TINY = {**QWEN25, "vocab_size": None, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024}
DRY_SIZES = {"tiny-a": TINY, "tiny-b": {**TINY, "num_hidden_layers": 3}}


@dataclass(frozen=True)
class Scale:
    sizes: dict
    rows: int                 # memorisation rows
    words: tuple[int, int]    # answer length range in words
    sft_steps: int            # x 8 rows: whole epochs, so every implementation trains on the same rows
    dpo_steps: int            # x 8 pairs: one epoch
    grpo_steps: int
    grpo_prompts: int         # per step (x GROUP completions)
    new_tokens: int           # GRPO completions and generation
    gen_prompts: int
    matmul: int               # side of the peak's square matmul
    on_gpu: bool


GROUP = 8
GPU_SCALE = Scale(GPU_SIZES, rows=64, words=(30, 330), sft_steps=32, dpo_steps=8, grpo_steps=4, grpo_prompts=4,
                  new_tokens=64, gen_prompts=64, matmul=8192, on_gpu=True)
DRY_SCALE = Scale(DRY_SIZES, rows=16, words=(5, 40), sft_steps=4, dpo_steps=2, grpo_steps=2, grpo_prompts=2,
                  new_tokens=8, gen_prompts=8, matmul=512, on_gpu=False)
LORA_LR, FULL_LR = 2e-4, 5e-5   # bench/common.py's LoRA rate and bench/configs.py's full fine-tuning rate


@dataclass(frozen=True)
class Section:
    kind: str                 # peak, models, lora, full, qlora, dpo, grpo, generate, fsdp
    size: str = ""
    impl: str = ""            # tunesmith, tutorial, trl
    seconds: float = 60       # what it is expected to take on an H100 (the budget check)

    @property
    def key(self) -> str:
        return ":".join(x for x in (self.kind, self.size, self.impl) if x)


def plan(scale: Scale) -> list[Section]:
    """In priority order: what matters most runs first, so a short budget loses the least. --dry-run leaves out the
    second size's full fine-tuning and QLoRA (the same code paths as the first size's)."""
    small, large = list(scale.sizes)
    pair = lambda kind, size, s, other="tutorial": [Section(kind, size, "tunesmith", s), Section(kind, size, other, s)]  # noqa: E731
    # seconds: guesses for an H100 (imports, model load, 32 steps, tunesmith's evaluations and save); a run's JSON
    # has every section's wall_s to correct them
    return [Section("peak", seconds=10), Section("models", seconds=25),
            *pair("lora", small, 15), *pair("lora", large, 20), Section("generate", small, seconds=30),
            Section("fsdp", seconds=40), *pair("full", small, 20), *pair("qlora", small, 20),
            *pair("dpo", small, 25, "trl"), *pair("grpo", small, 35, "trl"),
            *(pair("full", large, 35) + pair("qlora", large, 25) if scale.on_gpu else [])]


def groups_of(sections: list[Section], dry: bool) -> list[list[Section]]:
    """Which sections share a child process. --dry-run: all (the imports once). On the GPU: peak with models, and each
    tunesmith / tutorial pair of one kind and size (tunesmith first, so the tutorial runs in the warmer process); each
    section resets the peak-memory counter and reports the peak above what it found allocated. A CUDA error that
    poisons a process loses only its group."""
    if dry:
        return [sections]
    groups: list[list[Section]] = []
    for s in sections:
        prev = groups[-1][-1] if groups else None
        same = prev is not None and ((prev.kind, prev.size) == (s.kind, s.size) or (prev.kind, s.kind) == ("peak", "models"))
        if same:
            groups[-1].append(s)
        else:
            groups.append([s])
    return groups


# ----------------------------------------------------------------------------------------------------------------
# the parent: prepares, runs each section in a child process, writes the table
# ----------------------------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny models on the CPU, every section, < 1 min")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(HERE / "results"), help="where the table goes")
    ap.add_argument("--budget-s", type=float, default=450, help="skip sections that would end after this many seconds")
    ap.add_argument("--work", help="scratch folder (models, data, runs); default a new temporary one, removed at the end")
    ap.add_argument("--only", help="comma-separated section kinds to run (peak and models always run)")
    ap.add_argument("--fetch-wheels", action="store_true", help="download bench/gpu-wheels.txt into bench/wheels/ and stop")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.fetch_wheels:
        return fetch_wheels()
    scale = DRY_SCALE if args.dry_run else GPU_SCALE
    if args.child:
        return child(args.child.split(","), Path(args.work), scale)

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="tunesmith-gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = child_environment(work, install=not args.dry_run)
    sections = plan(scale)
    if args.only:
        keep = {"peak", "models", *args.only.split(",")}
        sections = [s for s in sections if s.kind in keep]
    # --dry-run: one child for all sections (the imports once: < 1 min on 2 cores); on the GPU one child per section
    # (its own peak memory, and a CUDA error cannot poison the sections after it)
    results: dict[str, dict] = {}
    logs = []
    for group in groups_of(sections, args.dry_run):
        left = args.budget_s - (time.perf_counter() - t0)
        todo, planned = [], 0.0
        for s in group:
            need = 0 if args.dry_run else s.seconds
            if s.kind != "peak" and "models" in results and results["models"].get("error"):
                results[s.key] = {"skip": "the models section failed"}
            elif planned + need > left:
                results[s.key] = {"skip": f"time budget: {left - planned:.0f} s of --budget-s {args.budget_s:.0f} left, "
                                          f"needs ~{need:.0f} s"}
            else:
                todo.append(s)
                planned += need
        if not todo:
            continue
        print(f"[{time.perf_counter() - t0:5.0f} s] {', '.join(s.key for s in todo)}", flush=True)
        got, log = run_child(todo, work, env, args.dry_run, timeout=max(left, 5))
        logs.append(log)
        results.update(got)
        for s in todo:
            print(f"         {s.key}: {one_line(results[s.key])}", flush=True)
    total = time.perf_counter() - t0
    table = render(sections, results, scale)
    meta = {"device": results.get("peak", {}).get("device"), "versions": results.get("peak", {}).get("versions"),
            "imports": results.get("peak", {}).get("imports"),
            "seconds": round(total, 1), "budget_s": args.budget_s, "dry_run": args.dry_run,
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    header = (f"command: `{meta['command']}` ({meta['date']}, {total:.0f} s)\n\ndevice: {meta['device']}\n\n"
              f"versions: {meta['versions']}\n\nthe sections' modules: {meta['imports']}\n\n")
    print("\n" + header + table, flush=True)
    (out / "gpu-bench.md").write_text(header + table + "\n")
    (out / "gpu-bench.json").write_text(json.dumps({**meta, "sections": [{"key": s.key, **results.get(s.key, {})}
                                                                         for s in sections]}, indent=1))
    (out / "gpu-bench-logs.txt").write_text("\n\n".join(logs)[-4_000_000:])
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def child_environment(work: Path, install: bool) -> dict:
    """The children's environment: the carried wheels installed offline (once) and put first on the path, tunesmith
    from src/, caches inside the scratch folder, no hub."""
    env = dict(os.environ)
    paths = [str(ROOT / "src"), str(HERE)]
    if install and WHEELS.is_dir() and any(WHEELS.glob("*.whl")):
        if not (SITE / ".installed").exists():
            names = [ln.split("#")[0].strip() for ln in WHEEL_LIST.read_text().splitlines()]
            cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                   "--upgrade", "--target", str(SITE), "--find-links", str(WHEELS), *[n for n in names if n]]
            t = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                print(f"installing the carried wheels failed (the sections will say what is missing):\n{done.stderr[-2000:]}")
            else:
                (SITE / ".installed").write_text("")
                print(f"carried wheels installed into {SITE} ({time.perf_counter() - t:.0f} s)")
        paths.insert(0, str(SITE))
    elif install:
        print(f"no wheels in {WHEELS}: using what this Python has (fetch them here with: bench/gpu.py --fetch-wheels)")
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(TUNESMITH_CACHE=str(work / "cache"), TUNESMITH_DATA_CACHE=str(work / "data-cache"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false",
               WANDB_DISABLED="true", PYTHONUNBUFFERED="1", HF_HOME=str(work / "hf"))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def run_child(sections: list[Section], work: Path, env: dict, dry: bool, timeout: float) -> tuple[dict, str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", ",".join(s.key for s in sections), "--work", str(work)]
    cmd += ["--dry-run"] if dry else []
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        stdout, stderr, failed = p.stdout, p.stderr, f"the process exited with code {p.returncode}" if p.returncode else ""
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
        stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else e.stderr or ""
        failed = f"stopped at the time budget ({timeout:.0f} s)"
    got = {}
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[7:])
            got[r.pop("key")] = r
    for s in sections:
        if s.key not in got:
            got[s.key] = {"error": f"{failed or 'no result'}: {last_error(stderr)}"}
    return got, f"==== {', '.join(s.key for s in sections)}\n{stdout[-200_000:]}\n---- stderr\n{stderr[-200_000:]}"


def last_error(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", ln)]
    return (errors or lines or ["(no output)"])[-1][:300]


def one_line(r: dict) -> str:
    if r.get("skip"):
        return "skipped: " + r["skip"]
    if r.get("error"):
        return "FAILED: " + r["error"]
    return ", ".join(f"{k} {v}" for k, v in r.items() if k in ("tok_s", "peak_mib", "tflops", "seconds", "loss_first", "loss_last", "note"))


def fmt(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def render(sections: list[Section], results: dict, scale: Scale) -> str:
    """One markdown table: a row per section that trains or generates, ratios against the tutorial row beside it."""
    peak = results.get("peak", {}).get("tflops")
    mem = "peak GPU MiB" if scale.on_gpu else "peak RSS MiB (CPU)"
    lines = [f"| section | model | implementation | tokens/s | tokens/s after step {WARM_STEPS} | x tutorial | {mem} | "
             f"x tutorial | MFU | train loss first -> last | memorised loss after | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in sections:
        r = results.get(s.key, {})
        if s.kind in ("peak", "models"):
            if r.get("error") or r.get("skip"):
                lines.append(f"| {s.kind} | | | | | | | | | | | {status(r)} |")
            continue
        for row in r.get("rows") or [r]:
            base = base_row(s, row, sections, results)
            tok_ratio = row.get("tok_s") / base["tok_s"] if base and row.get("tok_s") and base.get("tok_s") else None
            mem_ratio = row.get("peak_mib") / base["peak_mib"] if base and row.get("peak_mib") and base.get("peak_mib") else None
            mfu = row["flops"] / row["seconds"] / (peak * 1e12) if peak and row.get("flops") and row.get("seconds") else None
            losses = (f"{row['loss_first']:.3f} -> {row['loss_last']:.3f}" if row.get("loss_first") is not None
                      and row.get("loss_last") is not None else "-")
            lines.append(f"| {s.kind} | {s.size or row.get('model', '')} | {row.get('impl', s.impl)} | {fmt(row.get('tok_s'))} | "
                         f"{fmt(row.get('steady_tok_s'))} | {fmt(tok_ratio, 2) if tok_ratio else '-'} | {fmt(row.get('peak_mib'), 0)} | "
                         f"{fmt(mem_ratio, 2) if mem_ratio else '-'} | {f'{100 * mfu:.1f}%' if mfu else '-'} | {losses} | "
                         f"{fmt(row.get('mem_loss'), 3)} | {status(row) if (row.get('error') or row.get('skip')) else row.get('note', '')} |")
    unit = "bf16" if scale.on_gpu else "fp32 (CPU)"
    lines += ["", f"{unit} matmul peak measured in this run: {peak:.3g} TFLOP/s" if peak else f"{unit} matmul peak: not measured ({status(results.get('peak', {}))})"]
    return "\n".join(lines)


def base_row(s: Section, row: dict, sections: list[Section], results: dict) -> dict | None:
    """What a row is compared with: the tutorial (or TRL) row of the same kind and model; for generation, its first row."""
    if s.kind == "generate":
        rows = results.get(s.key, {}).get("rows") or []
        return rows[0] if rows and rows[0] is not row else None
    if s.impl != "tunesmith":
        return None
    other = next((o for o in sections if o.kind == s.kind and o.size == s.size and o.impl != "tunesmith"), None)
    found = results.get(other.key) if other else None
    return found if found and not found.get("error") and not found.get("skip") else None


def status(r: dict) -> str:
    if r.get("skip"):
        return "skipped: " + r["skip"].replace("|", "/")
    if r.get("error"):
        return "FAILED: " + r["error"].replace("|", "/")
    return ""


def fetch_wheels() -> None:
    """pip download of bench/gpu-wheels.txt for the GPU machine (Python 3.12, x86-64 manylinux); a package PyPI has
    only as source (its line says 'builds its wheel here') is built into a wheel here; bitsandbytes is slimmed to its
    CPU and CUDA 13 libraries (the GPU machine's torch is a cu130 build; its CUDA 11/12 and ROCm libraries would take
    40 of the 64 MiB a call may carry)."""
    lines = [ln for ln in WHEEL_LIST.read_text().splitlines() if ln.split("#")[0].strip()]
    build = [ln.split("#")[0].strip() for ln in lines if "builds its wheel here" in ln]
    binary = [ln.split("#")[0].strip() for ln in lines if "builds its wheel here" not in ln]
    WHEELS.mkdir(exist_ok=True)
    plats = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                                          "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                    "--implementation", "cp", *plats, "-d", str(WHEELS), *binary], check=True)
    if build:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(WHEELS), *build], check=True)
    for wheel in WHEELS.glob("bitsandbytes-*.whl"):
        slim_wheel(wheel, keep=re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$"), drop=re.compile(r"libbitsandbytes_\w+\.so$"))
    size = sum(p.stat().st_size for p in WHEELS.glob("*.whl"))
    print(f"{len(list(WHEELS.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB in {WHEELS}")


def slim_wheel(wheel: Path, keep: re.Pattern, drop: re.Pattern) -> None:
    """Rewrite `wheel` without the files `drop` matches unless `keep` does (RECORD rewritten to match)."""
    import zipfile

    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        gone = {n for n in src.namelist() if drop.search(n) and not keep.search(n)}
        for item in src.infolist():
            if item.filename in gone:
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                data = "".join(ln for ln in data.decode().splitlines(keepends=True) if ln.split(",")[0] not in gone).encode()
            dst.writestr(item, data)
    os.replace(tmp, wheel)


# ----------------------------------------------------------------------------------------------------------------
# the child: runs sections, prints one RESULT line each
# ----------------------------------------------------------------------------------------------------------------

def child(keys: list[str], work: Path, scale: Scale) -> None:
    import torch

    sys.path.insert(0, str(HERE))
    from common import emit

    device = torch.device("cuda" if scale.on_gpu and torch.cuda.is_available() else "cpu")
    if scale.on_gpu and device.type != "cuda":
        raise SystemExit("no CUDA device: run with --dry-run on a machine without a GPU")
    warm_up(device)
    for key in keys:
        kind, *rest = key.split(":")
        size = rest[0] if rest and kind not in ("peak", "models", "fsdp") else ""
        impl = rest[1] if len(rest) > 1 else ""
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            BEFORE["allocated"] = torch.cuda.memory_allocated()
        t = time.perf_counter()
        try:
            result = SECTIONS[kind](work=work, scale=scale, device=device, size=size, impl=impl)
        except Skip as e:
            result = {"skip": str(e)}
        except Exception as e:  # recorded in the table; the next section runs
            traceback.print_exc()
            result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
        result["wall_s"] = round(time.perf_counter() - t, 1)
        emit({"key": key, **result})
        if device.type == "cuda":
            torch.cuda.synchronize()


BEFORE = {"allocated": 0}  # bytes a section found allocated when it started (left by the one before it)


def warm_up(device) -> None:
    """CUDA context, cuBLAS/cuBLASLt handles and their workspaces made before any section's clock starts."""
    import torch

    if device.type == "cuda":
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(256, 256, device=device, dtype=dtype, requires_grad=True)
            (x @ x).sum().backward()
        torch.cuda.synchronize()


class Skip(Exception):
    """A section that cannot run here, with the reason (it is reported, not failed)."""


def section_peak(work, scale, device, **_) -> dict:
    """bf16 matmul TFLOP/s (fp32 on the CPU), the mean of 10 products after 3 warm-ups."""
    import torch

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = scale.matmul
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    tflops = 10 * 2 * n ** 3 / (time.perf_counter() - t) / 1e12
    (work / "peak.json").write_text(json.dumps({"tflops": tflops}))  # for the generation section's share of peak
    return {"tflops": round(tflops, 2), "device": device_name(device), "versions": versions(), "imports": imports()}


def imports() -> str:
    """Which of the modules the sections need fail to import here (a missing carried wheel shows up at once)."""
    import importlib

    failed = []
    for name in ("transformers", "peft", "trl", "datasets", "bitsandbytes", "pydantic", "rouge_score", "tunesmith.train.loop"):
        try:
            importlib.import_module(name)
        except Exception as e:
            failed.append(f"{name} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"[:160])
    return "all import" if not failed else "failing: " + "; ".join(failed)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        p = torch.cuda.get_device_properties(0)
        return f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, CUDA {torch.version.cuda}"
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


def versions() -> str:
    import importlib.metadata as md

    got = []
    for name in ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "bitsandbytes"):
        try:
            got.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            got.append(f"{name} -")
    return ", ".join(got) + f", Python {platform.python_version()}"


# -- data and models ------------------------------------------------------------------------------------------------

WORDS = ("the of and to in is was for on with as by at from that this it be are or an which were have has had not but "
         "river mountain city garden library window market summer winter morning evening letter story music village "
         "bridge harbour forest island engine signal number answer question teacher student doctor farmer painter "
         "walks carries opens closes builds finds keeps reads writes sings counts measures follows turns holds "
         "quietly quickly slowly brightly carefully suddenly early late north south east west red blue green golden "
         "silver small large old new warm cold bright dark first second third last every many few several").split()
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def memorisation_rows(scale: Scale) -> list[dict]:
    """Instruction rows whose answers are seeded word sequences of varied length (the padding a recipe wastes varies)."""
    rng = random.Random(0)
    rows = []
    for i in range(scale.rows):
        n = rng.randint(*scale.words)
        rows.append({"instruction": f"Recite passage {i} of the archive.", "input": "",
                     "output": " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."})
    return rows


def section_models(work, scale, device, **_) -> dict:
    """A byte-level BPE tokenizer with ChatML, trained on the rows; one random-weight model folder per size (plus a
    tiny one for the FSDP smoke run); the data files."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    rows = memorisation_rows(scale)
    corpus = [r["instruction"] + " " + r["output"] for r in rows] * 4
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=2048, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<unk>",
                                  pad_token="<|im_end|>")
    tok.chat_template = CHATML
    built = {}
    for name, spec in {**scale.sizes, "fsdp-tiny": TINY}.items():
        spec = dict(spec)
        if spec["vocab_size"] is None:
            spec["vocab_size"] = (len(tok) + 63) // 64 * 64 + 64
        model_type = spec.pop("model_type")
        cfg = AutoConfig.for_model(model_type, **spec, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        folder = work / "models" / name
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        built[name] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
        del model
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    write_jsonl(data / "sft.jsonl", rows)
    write_jsonl(data / "sft-val.jsonl", rows[:16])  # memorisation: measured on rows it trains on
    rng = random.Random(1)
    pairs = [{"prompt": r["instruction"], "chosen": r["output"], "rejected": rng.choice(rows)["output"]} for r in rows]
    write_jsonl(data / "dpo.jsonl", pairs)
    write_jsonl(data / "dpo-val.jsonl", pairs[:8])
    prompts = [{"prompt": f"{r['instruction']} Then write #### and the passage number.", "answer": str(i)}
               for i, r in enumerate(rows)]
    write_jsonl(data / "rl.jsonl", prompts)
    write_jsonl(data / "rl-val.jsonl", prompts[:4])
    return {"note": "; ".join(f"{k} {v}M parameters" for k, v in built.items()) + f"; tokenizer {len(tok)} tokens"}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


# -- shared measurements ------------------------------------------------------------------------------------------

def peak_mib(device) -> float:
    import torch

    from common import maxrss_mib

    if device.type == "cuda":  # what the section added at its peak, above what it found allocated
        return (torch.cuda.max_memory_allocated() - BEFORE["allocated"]) / 2**20
    return maxrss_mib()


def steady(times: list[float], tokens: int) -> float | None:
    """Tokens/s after the first WARM_STEPS steps (`times`: each step's end, seconds; tokens spread evenly over steps)."""
    if len(times) <= WARM_STEPS + 1:
        return None
    n = len(times)
    return tokens * (n - WARM_STEPS) / n / (times[-1] - times[WARM_STEPS - 1])


def sft_rows_stats(tok, rows: list[dict]) -> tuple[int, float, float]:
    """Real tokens, mean length and the trained (response) share of the rows as the chat template renders them."""
    from common import chat_ids

    ids = [chat_ids(tok, r) for r in rows]
    real = sum(len(f) for f, _ in ids)
    return real, real / len(ids), sum(len(f) - p for f, p in ids) / real


def model_flops(model_dir: Path, tok, rows: list[dict], full: bool) -> tuple[int, float]:
    from transformers import AutoConfig

    from common import flops_per_token

    real, mean_len, share = sft_rows_stats(tok, rows)
    return real, flops_per_token(AutoConfig.from_pretrained(model_dir), mean_len, share, full) * real


def memorised_loss(model, tok, rows: list[dict], device) -> float:
    """Mean NLL over the answers' tokens (end of turn included) of `rows`, fp32 logits: bench/common.py's
    heldout_response_loss on the model's device, the same code for every implementation."""
    import torch
    import torch.nn.functional as F

    from common import chat_ids

    model.eval()
    data = sorted((chat_ids(tok, r) for r in rows), key=lambda x: len(x[0]))
    total = count = 0.0
    with torch.no_grad():
        for i in range(0, len(data), 4):
            chunk = data[i:i + 4]
            width = max(len(f) for f, _ in chunk)
            ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
            att, resp = torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
            for j, (f, p) in enumerate(chunk):
                ids[j, :len(f)], att[j, :len(f)], resp[j, p:len(f)] = torch.tensor(f), 1, True
            ids, att, resp = ids.to(device), att.to(device), resp.to(device)
            logits = model(input_ids=ids, attention_mask=att).logits
            nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
            total += nll[resp[:, 1:]].sum().item()
            count += resp[:, 1:].sum().item()
    return round(total / count, 4)


# -- tunesmith --------------------------------------------------------------------------------------------------------

def tunesmith_run(work: Path, name: str, overrides: list[str]) -> tuple[dict, list[dict], Path]:
    from tunesmith.config import load_config
    from tunesmith.train.loop import train

    cfg = load_config(None, [*overrides, "eval.samples=0", f"output.dir={work / 'runs'}", f"output.name={name}"])
    result = train(cfg, force=True)
    metrics = [json.loads(x) for x in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    return result.summary, [m for m in metrics if "loss" in m and "tokens" in m], Path(result.run_dir)


def lora_keys(name: str = "lora") -> list[str]:
    from common import LORA

    return [f"method.name={name}", f"method.r={LORA['r']}", f"method.alpha={LORA['alpha']}",
            f"method.target_modules={LORA['targets']}", f"train.lr={LORA_LR}"]


def section_sft(work, scale, device, size, impl, kind) -> dict:
    """lora / full / qlora: tunesmith or the tutorial on the memorisation rows, scale.sft_steps x 8 rows."""
    import torch

    from tunesmith.methods.load import load_model
    from tunesmith.models import load_tokenizer

    model_dir = work / "models" / size
    tok = load_tokenizer(model_dir)
    rows = read_jsonl(work / "data" / "sft.jsonl")
    if kind == "qlora":
        check_bitsandbytes(device)
    n_rows = scale.sft_steps * 8
    trained = [rows[i % len(rows)] for i in range(n_rows)]  # what both see: whole epochs of the rows
    real, flops = model_flops(model_dir, tok, trained, kind == "full")
    if impl == "tunesmith":
        method = (["method.name=full", "method.freeze_embeddings=false", f"train.lr={FULL_LR}"] if kind == "full"
                  else lora_keys(kind))
        summary, metrics, run_dir = tunesmith_run(work, f"{kind}-{size}", [
            f"model.name={model_dir}", f"data.path={work / 'data' / 'sft.jsonl'}",
            f"data.val_path={work / 'data' / 'sft-val.jsonl'}", f"data.max_length={MAX_LEN}", f"train.max_steps={scale.sft_steps}",
            "train.micro_batch_size=8", "train.grad_accum=1", "train.warmup=0", "train.schedule=linear",
            "eval.max_examples=16", *method])
        seconds, peak = summary["loop_seconds"], peak_mib(device)
        times = [m["elapsed"] for m in metrics]
        first, last = metrics[0]["loss"], metrics[-1]["loss"]
        mem = memorised_loss(load_model(run_dir / "final", getattr(torch, summary["dtype"]), device), tok, rows[:16], device)
        note = f"{summary['dtype']} weights" + (", bf16 matmuls" if summary.get("mixed_precision") else "")
        note += "; its own held-out loss after: " + fmt((summary.get("after") or {}).get("eval_loss"), 3)
        if kind == "qlora":
            note += "; memorised loss read with the adapter on the bf16 base (tunesmith's final/ de-quantizes)"
        if summary["tokens"] != real:  # whole epochs make them equal
            note += f"; trained {summary['tokens']} tokens (planned {real})"
            real, flops = summary["tokens"], flops * summary["tokens"] / real
    else:
        seconds, model, times, history = tutorial_sft(model_dir, tok, trained, scale.sft_steps, kind, device)
        peak = peak_mib(device)
        losses = [h["loss"] for h in history if "loss" in h]
        first, last = (losses[0], losses[-1]) if losses else (None, None)
        mem = memorised_loss(model, tok, rows[:16], device)
        note = {"lora": "bf16 weights (fp32 on a CPU), Trainer(bf16=True)", "full": "fp32 weights, Trainer(bf16=True) autocast",
                "qlora": "4-bit NF4 base, gradient checkpointing (prepare_model_for_kbit_training)"}[kind]
        note += "; pad to longest, labels = input_ids, batch 4 x 2"
    return {"tok_s": round(real / seconds, 1), "steady_tok_s": r1(steady(times, real)), "peak_mib": round(peak),
            "flops": flops, "seconds": round(seconds, 2), "loss_first": first, "loss_last": last, "mem_loss": mem,
            "tokens": real, "note": note}


def r1(x):
    return None if x is None else round(x, 1)


def check_bitsandbytes(device) -> None:
    """QLoRA needs bitsandbytes' 4-bit kernels on this device: one tiny quantize / dequantize, else a stated skip."""
    import torch

    try:
        import bitsandbytes.functional as bnbf
    except Exception as e:
        raise Skip(f"bitsandbytes does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"[:200])
    try:
        x = torch.randn(64, 64, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        q, state = bnbf.quantize_4bit(x, quant_type="nf4")
        back = bnbf.dequantize_4bit(q, state)
        if not torch.isfinite(back).all():
            raise RuntimeError("non-finite dequantized values")
    except Exception as e:
        raise Skip(f"bitsandbytes 4-bit kernels fail on {device.type} ({type(e).__name__}: "
                   f"{str(e).splitlines()[0] if str(e) else ''})"[:200])


def step_clock():
    """A TrainerCallback that notes the time at every optimizer step's end (the loss is read each step: synced)."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        times: list[float] = []

        def on_train_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()
            self.times = []

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.start)

    return Clock()


def tutorial_args(scale_steps: int, lr: float, device, **extra) -> dict:
    """The TrainingArguments every tutorial run shares (bench/configs.py's, on the GPU with bf16)."""
    return {**dict(output_dir=tempfile.mkdtemp(prefix="bench-tutorial-"), max_steps=scale_steps, learning_rate=lr,
                   lr_scheduler_type="linear", logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
                   use_cpu=device.type != "cuda", bf16=device.type == "cuda", dataloader_num_workers=0, seed=0), **extra}


def tutorial_sft(model_dir: Path, tok, rows: list[dict], steps: int, kind: str, device):
    """bench/configs.py's HF Trainer + PEFT recipe on the GPU: LoRA r32/a32/dropout 0.05 on q,k,v,o, pad to longest,
    labels = input_ids, batch 4 x accumulation 2; bf16 weights for LoRA, fp32 + bf16 autocast for full fine-tuning,
    the QLoRA tutorial's 4-bit base."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from common import LORA, chat_ids

    ds = Dataset.from_list([{"input_ids": chat_ids(tok, r)[0]} for r in rows])
    on_gpu = device.type == "cuda"
    if kind == "qlora":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16 if on_gpu else torch.float32)
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, device_map={"": device},
                                                     dtype=torch.bfloat16 if on_gpu else torch.float32)
        model = prepare_model_for_kbit_training(model)
    else:
        dtype = torch.bfloat16 if kind == "lora" and on_gpu else torch.float32
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    if kind != "full":
        model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.05,
                                                 target_modules=LORA["targets"], task_type="CAUSAL_LM"))
    clock = step_clock()
    args = TrainingArguments(**tutorial_args(steps, FULL_LR if kind == "full" else LORA_LR, device,
                                             per_device_train_batch_size=4, gradient_accumulation_steps=2))
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                      callbacks=[clock])
    t = time.perf_counter()
    trainer.train()
    sync(device)
    return time.perf_counter() - t, trainer.model, clock.times, trainer.state.log_history


# -- DPO ------------------------------------------------------------------------------------------------------------

def section_dpo(work, scale, device, size, impl, **_) -> dict:
    from tunesmith.models import load_tokenizer

    model_dir = work / "models" / size
    tok = load_tokenizer(model_dir)
    pairs = read_jsonl(work / "data" / "dpo.jsonl")
    trained = [pairs[i % len(pairs)] for i in range(scale.dpo_steps * 8)]
    # real tokens: each pair's prompt with each answer, as both implementations run them
    sides = [{"instruction": p["prompt"], "output": p[k]} for p in trained for k in ("chosen", "rejected")]
    real, flops = model_flops(model_dir, tok, sides, False)
    if impl == "tunesmith":
        summary, metrics, _ = tunesmith_run(work, f"dpo-{size}", [
            "task=dpo", f"model.name={model_dir}", f"data.path={work / 'data' / 'dpo.jsonl'}",
            f"data.val_path={work / 'data' / 'dpo-val.jsonl'}", f"data.max_length={MAX_LEN}", f"train.max_steps={scale.dpo_steps}",
            "train.micro_batch_size=8", "train.grad_accum=1", "train.warmup=0", "train.schedule=linear", "eval.max_examples=8",
            "dpo.beta=0.1", *lora_keys()])
        seconds, times = summary["loop_seconds"], [m["elapsed"] for m in metrics]
        first, last = metrics[0]["loss"], metrics[-1]["loss"]
        note = "reference log-probs computed once before the loop (not in its time)"
    else:
        seconds, times, history = trl_dpo(model_dir, tok, trained, scale.dpo_steps, device)
        losses = [h["loss"] for h in history if "loss" in h]
        first, last = (losses[0], losses[-1]) if losses else (None, None)
        note = "TRL DPOTrainer + PEFT LoRA, reference = adapter off, every step; batch 4 x 2; TRL's default gradient checkpointing"
    return {"tok_s": round(real / seconds, 1), "steady_tok_s": r1(steady(times, real)), "peak_mib": round(peak_mib(device)),
            "flops": flops, "seconds": round(seconds, 2), "loss_first": first, "loss_last": last, "tokens": real, "note": note}


def trl_dpo(model_dir: Path, tok, pairs: list[dict], steps: int, device):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from common import LORA

    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": p["prompt"]}],
                             "chosen": [{"role": "assistant", "content": p["chosen"]}],
                             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).to(device)
    clock = step_clock()
    args = DPOConfig(**tutorial_args(steps, LORA_LR, device, per_device_train_batch_size=4, gradient_accumulation_steps=2),
                     beta=0.1, max_length=2 * MAX_LEN)
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[clock],
                         peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.05,
                                                target_modules=LORA["targets"], task_type="CAUSAL_LM"))
    t = time.perf_counter()
    trainer.train()
    sync(device)
    return time.perf_counter() - t, clock.times, trainer.state.log_history


# -- GRPO -----------------------------------------------------------------------------------------------------------

REWARD_PATTERN = "####"


def section_grpo(work, scale, device, size, impl, **_) -> dict:
    """A few GRPO steps: scale.grpo_prompts prompts x GROUP completions of up to scale.new_tokens tokens, LoRA, one
    regex reward, no KL term (both implementations' default), the DAPO token average (both defaults)."""
    model_dir = work / "models" / size
    prompts = read_jsonl(work / "data" / "rl.jsonl")
    if impl == "tunesmith":
        summary, metrics, _ = tunesmith_run(work, f"grpo-{size}", [
            "task=rl", f"model.name={model_dir}", f"data.path={work / 'data' / 'rl.jsonl'}",
            f"data.val_path={work / 'data' / 'rl-val.jsonl'}", f"data.max_length={MAX_LEN}", f"train.max_steps={scale.grpo_steps}",
            f"train.micro_batch_size={scale.grpo_prompts}", "train.grad_accum=1", "train.warmup=0", "train.schedule=constant",
            "eval.max_examples=4", f"eval.max_new_tokens={scale.new_tokens}", "rl.algorithm=grpo", "rl.loss=dapo",
            f"rl.group_size={GROUP}", f"rl.max_new_tokens={scale.new_tokens}", "rl.beta=0",
            f"rl.rewards=[{{kind: regex, pattern: '{REWARD_PATTERN}'}}]", *lora_keys()])
        seconds = summary["loop_seconds"]
        completions = sum(m.get("completion_tokens", 0) for m in metrics)
        times = [m["elapsed"] for m in metrics]
        rollout = sum(m.get("rollout_seconds", 0) for m in metrics)
        note = f"rollouts on tunesmith's engine: {rollout:.1f} s of {seconds:.1f} s"
    else:
        seconds, times, history = trl_grpo(model_dir, prompts, scale, device)
        lengths = [h["completions/mean_length"] for h in history if "completions/mean_length" in h]
        completions = round(sum(lengths) * scale.grpo_prompts * GROUP)
        note = "TRL GRPOTrainer + PEFT LoRA, rollouts with model.generate; TRL's default gradient checkpointing"
    return {"tok_s": round(completions / seconds, 1), "steady_tok_s": None, "peak_mib": round(peak_mib(device)),
            "seconds": round(seconds, 2), "s_per_step": round(seconds / max(len(times), 1), 2), "tokens": completions,
            "note": f"completion tokens/s; {round(seconds / max(len(times), 1), 2)} s/step; " + note}


def trl_grpo(model_dir: Path, prompts: list[dict], scale: Scale, device):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from common import LORA
    from tunesmith.models import load_tokenizer

    tok = load_tokenizer(model_dir)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": p["prompt"]}]} for p in prompts])

    def regex_reward(completions, **kw):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [1.0 if re.search(REWARD_PATTERN, t) else 0.0 for t in texts]

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).to(device)
    clock = step_clock()
    args = GRPOConfig(**tutorial_args(scale.grpo_steps, LORA_LR, device, per_device_train_batch_size=scale.grpo_prompts * GROUP,
                                      gradient_accumulation_steps=1, lr_scheduler_type="constant"),
                      num_generations=GROUP, max_completion_length=scale.new_tokens, temperature=1.0, beta=0.0,
                      loss_type="dapo")
    trainer = GRPOTrainer(model=model, reward_funcs=regex_reward, args=args, train_dataset=ds, processing_class=tok,
                          callbacks=[clock], peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.05,
                                                                    target_modules=LORA["targets"], task_type="CAUSAL_LM"))
    t = time.perf_counter()
    trainer.train()
    sync(device)
    return time.perf_counter() - t, clock.times, trainer.state.log_history


# -- generation -----------------------------------------------------------------------------------------------------

def section_generate(work, scale, device, size, **_) -> dict:
    """bench/generate.py's model.generate and engine runs on the same prompts (greedy, scale.new_tokens new tokens),
    after one small warm-up of each."""

    import generate as gen
    from tunesmith.methods.load import load_model
    from tunesmith.models import inference_dtype, load_tokenizer

    model_dir = work / "models" / size
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, inference_dtype(device), device).eval()
    rows = read_jsonl(work / "data" / "sft.jsonl")
    rng = random.Random(2)
    prompts = [tok.apply_chat_template([{"role": "user", "content": r["instruction"] + " " + " ".join(r["output"].split()[:rng.randint(5, 150)])}],
                                       tokenize=False, add_generation_prompt=True) for r in rows[:scale.gen_prompts]]
    prompt_tokens = sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    fpt = gen.flops_per_token(model)
    peak_gflops = json.loads((work / "peak.json").read_text())["tflops"] * 1e3 if (work / "peak.json").exists() else 1.0
    gen.hf(model, tok, prompts[:2], 2, 2)  # warm-ups: kernels, allocator
    gen.engine_run(model, tok, prompts[:2], 2, rows=2)
    sync(device)
    out = []
    reset_peak(device)
    outs_hf, secs, firsts = gen.hf(model, tok, prompts, scale.new_tokens, 16)
    out.append({"impl": "model.generate, batches of 16", "peak": peak_mib(device),
                **gen.row("hf", outs_hf, secs, firsts, prompt_tokens, fpt, peak_gflops)})
    reset_peak(device)
    outs_engine, secs, firsts = gen.engine_run(model, tok, prompts, scale.new_tokens, rows=64)
    same = sum(a == b for a, b in zip(outs_engine, outs_hf))
    out.append({"impl": "tunesmith engine, 64 rows", "peak": peak_mib(device),
                **gen.row("engine", outs_engine, secs, firsts, prompt_tokens, fpt, peak_gflops),
                "same_as_generate": f"{same}/{len(prompts)}"})
    rows_out = []
    for r in out:
        rows_out.append({"impl": r["impl"], "tok_s": r["tok_s"], "peak_mib": round(r["peak"]), "seconds": r["seconds"],
                         "flops": r["gflops"] * 1e9 * r["seconds"],
                         "note": f"generated tokens/s ({r['new_tokens']} tokens, {len(prompts)} prompts, {prompt_tokens} prompt "
                                 f"tokens); mean time to first token {r['ttft_s']} s"
                                 + (f"; greedy answers equal to model.generate's: {r['same_as_generate']}" if "same_as_generate" in r else "")})
    del model
    return {"rows": rows_out, "note": f"{str(inference_dtype(device)).removeprefix('torch.')} weights; peak memory of each run"}


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


# -- FSDP -----------------------------------------------------------------------------------------------------------

def section_fsdp(work, scale, device, **_) -> dict:
    """(1) `tunesmith train --nproc 1 train.distributed=fsdp` under torchrun on the tiny model; (2) tunesmith's FSDP2
    sharding on a process group of one, checked against the unsharded model (loss, gradient norm, gathered weights)."""
    model_dir = work / "models" / "fsdp-tiny"
    cmd = [sys.executable, "-m", "tunesmith.cli.main", "train", "--nproc", "1", "train.distributed=fsdp",
           f"model.name={model_dir}", f"data.path={work / 'data' / 'sft.jsonl'}", f"data.val_path={work / 'data' / 'sft-val.jsonl'}",
           "train.max_steps=3", "train.micro_batch_size=4", "eval.max_examples=4", "eval.samples=0", "method.name=lora",
           f"output.dir={work / 'runs'}", "output.name=fsdp-torchrun"]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    launch_s = time.perf_counter() - t
    print(p.stdout[-3000:], p.stderr[-5000:], sep="\n", file=sys.stderr)
    if p.returncode:
        raise RuntimeError(f"tunesmith train --nproc 1 exited {p.returncode}: {last_error(p.stderr)}")
    summary = json.loads((work / "runs" / "fsdp-torchrun" / "eval.json").read_text())
    check = fsdp_world_of_one(model_dir, device)
    return {"tok_s": summary["tok_s"], "peak_mib": None, "seconds": round(launch_s, 1),
            "note": f"torchrun --nproc 1: {summary['steps']} steps, exit 0, {launch_s:.0f} s with the launch; " + check}


def fsdp_world_of_one(model_dir: Path, device) -> str:
    import copy

    import torch
    import torch.distributed as dist

    from tunesmith.methods.load import load_model
    from tunesmith.train import distributed

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = load_model(model_dir, torch.float32, device)
        reference = copy.deepcopy(model)
        ids = torch.randint(3, 200, (2, 24), device=device)

        def loss_and_grad(m):
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            norm = torch.nn.utils.get_total_norm([p.grad for p in m.parameters() if p.grad is not None])
            return float(loss), float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

        want = loss_and_grad(reference)
        distributed.shard_model(model, distributed.Dist(fsdp=True))
        got = loss_and_grad(model)
        full = distributed.full_state_dict(model)
        same = all(torch.equal(full[k].cpu(), v.cpu()) for k, v in reference.state_dict().items())
        if abs(got[0] - want[0]) > 1e-4 * abs(want[0]) or abs(got[1] - want[1]) > 1e-3 * abs(want[1]) or not same:
            raise RuntimeError(f"FSDP2 on one {backend} process differs: loss {got[0]} vs {want[0]}, grad norm {got[1]} vs "
                               f"{want[1]}, gathered weights equal: {same}")
        return f"FSDP2 sharding on one {backend} process: loss {got[0]:.4f} and gradient norm equal to unsharded, weights gathered"
    finally:
        dist.destroy_process_group()


SECTIONS = {"peak": section_peak, "models": section_models, "generate": section_generate, "fsdp": section_fsdp,
            "dpo": section_dpo, "grpo": section_grpo,
            **{k: (lambda kind: lambda **kw: section_sft(kind=kind, **kw))(k) for k in ("lora", "full", "qlora")}}


if __name__ == "__main__":
    main()
