"""`tunesmith export RUN_DIR --format hf|gguf|adapter`: one entry point, never overwriting."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.export.gguf_file import verify, write_gguf
from tunesmith.export.hf import export_adapter, export_hf, mark_export, merged_model
from tunesmith.export.modelfile import modelfile
from tunesmith.methods.load import prompt_format
from tunesmith.models import resolve_model_dir
from tunesmith.run import RunDir
from tunesmith.run.files import new_temp_dir, publish_written, write_json_atomic
from tunesmith.run.layout import EXPORT_MARKER


def export_run(run_dir: Path, fmt: str, dtype: str = "f32", quant: str | None = None, out: Path | None = None,
               overwrite: bool = False, log=print) -> Path:
    run = RunDir(run_dir)
    final = run.final
    if not final.is_dir():
        raise TunesmithError(f"{run_dir} has no final model (is it a finished tunesmith run?)")
    kind = quant or dtype
    out = Path(out) if out else run.exports / (fmt if fmt != "gguf" else f"gguf-{kind}")
    check_export_target(run, out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "adapter":
        export_adapter(run_dir, out)
    elif fmt == "hf":
        export_hf(final, out, {"f32": torch.float32, "f16": torch.float16}[dtype])
    else:
        cfg = load_config(str(run.config))
        model, tokenizer = merged_model(final)
        source = _source_gguf(cfg.model.name)
        name = f"{run.name}-{kind}.gguf"
        fmt_of_run = prompt_format(final)
        tmp = new_temp_dir(out)
        try:
            write_gguf(model, tokenizer, tmp / name, kind, source, fmt_of_run)
            check = verify(model, tokenizer, tmp / name, kind)
            write_json_atomic(tmp / "verification.json", check)
            (tmp / "Modelfile").write_text(modelfile(name, tokenizer, fmt_of_run))
            mark_export(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log(f"verification ({check['criterion']}): max logit difference {check['max_logit_diff']}, mean KL "
            f"{check['mean_kl']:.4f} nats, same top token {check['same_top_token']:.0%}, greedy continuations equal "
            f"{sum(check['same_greedy_continuation'])}/{len(check['same_greedy_continuation'])}"
            f" -> {'passed' if check['passed'] else 'FAILED'}")
        if not check["passed"]:  # never published at the deploy path: kept beside it to inspect
            rejected = out.with_name(out.name + ".rejected")
            if rejected.exists():
                check_export_target(run, rejected, overwrite=True)
            publish_written(tmp, rejected)
            raise TunesmithError(f"{name} does not reproduce the model ({check['criterion']} failed: {json.dumps(check)}); "
                                 f"it is kept in {rejected} to inspect, do not deploy it"
                                 + (f" ({out} is left as it was)" if out.exists() else ""))
        publish_written(tmp, out)
        log(f"run it with Ollama: cd {out} && ollama create {run.name.lower()} -f Modelfile && ollama run {run.name.lower()}")
        log(f"or llama.cpp: llama-cli -m {out / name} -cnv")
    log(f"exported: {out}")
    return out


def check_export_target(run: RunDir, out: Path, overwrite: bool) -> None:
    """An export never replaces the run it comes from (or anything holding it, or anything inside it but its export/
    folder), and `--overwrite` replaces only an export tunesmith wrote (its marker), never a folder of the user's."""
    target, home = out.resolve(), run.path.resolve()
    if target == home or home.is_relative_to(target):
        raise TunesmithError(f"--out {out} is the run {run} itself or holds it: an export goes into a folder of its own "
                             f"(default {run.exports}/FORMAT)")
    if target.is_relative_to(home) and not target.is_relative_to(run.exports.resolve()):
        raise TunesmithError(f"--out {out} is inside the run {run}: exports there go under {run.exports}/")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise TunesmithError(f"{out} already exists; pass --overwrite to replace it, or --out another folder")
        if out.is_symlink() or not out.is_dir() or not (out / EXPORT_MARKER).is_file():
            raise TunesmithError(f"{out} exists and is not an export tunesmith wrote (no {EXPORT_MARKER}); --overwrite "
                                 f"replaces only those: choose another --out, or move it away yourself")


def _source_gguf(model_name: str) -> Path | None:
    try:
        source = resolve_model_dir(model_name) / "tunesmith_source.json"
    except TunesmithError:
        return None
    return Path(json.loads(source.read_text())["gguf"]) if source.exists() else None
