"""`tunesmith export RUN_DIR --format hf|gguf|adapter`: one entry point, never overwriting."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.export.gguf_file import verify, write_gguf
from tunesmith.export.hf import export_adapter, export_hf, merged_model
from tunesmith.export.modelfile import modelfile
from tunesmith.models import resolve_model_dir
from tunesmith.run import RunDir
from tunesmith.run.files import publish_dir, write_json_atomic


def export_run(run_dir: Path, fmt: str, dtype: str = "f32", quant: str | None = None, out: Path | None = None,
               overwrite: bool = False, log=print) -> Path:
    run = RunDir(run_dir)
    final = run.final
    if not final.is_dir():
        raise TunesmithError(f"{run_dir} has no final model (is it a finished tunesmith run?)")
    kind = quant or dtype
    out = out or run.exports / (fmt if fmt != "gguf" else f"gguf-{kind}")
    if out.exists():
        if not overwrite:
            raise TunesmithError(f"{out} already exists; pass --overwrite to replace it, or --out another folder")
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "adapter":
        export_adapter(run_dir, out)
    elif fmt == "hf":
        export_hf(final, out, {"f32": torch.float32, "f16": torch.float16}[dtype])
    else:
        cfg = load_config(str(run.config))
        model, tokenizer = merged_model(final)
        source = _source_gguf(cfg.model.name)
        name = f"{run_dir.name}-{kind}.gguf"

        def write(tmp: Path) -> None:
            write_gguf(model, tokenizer, tmp / name, kind, source)
            check = verify(model, tokenizer, tmp / name, kind)
            write_json_atomic(tmp / "verification.json", check)
            (tmp / "Modelfile").write_text(modelfile(name, tokenizer, cfg.data.template))
            log(f"verification ({check['criterion']}): max logit difference {check['max_logit_diff']}, mean KL "
                f"{check['mean_kl']:.4f} nats, same top token {check['same_top_token']:.0%}, greedy continuations equal "
                f"{sum(check['same_greedy_continuation'])}/{len(check['same_greedy_continuation'])}"
                f" -> {'passed' if check['passed'] else 'FAILED'}")

        publish_dir(out, write)
        check = json.loads((out / "verification.json").read_text())
        if not check["passed"]:
            raise TunesmithError(f"{out / name} does not reproduce the model ({check['criterion']} failed: "
                                 f"{json.dumps(check)}); the files are kept in {out} to inspect, do not deploy them")
        log(f"run it with Ollama: cd {out} && ollama create {run_dir.name.lower()} -f Modelfile && ollama run {run_dir.name.lower()}")
        log(f"or llama.cpp: llama-cli -m {out / name} -cnv")
    log(f"exported: {out}")
    return out


def _source_gguf(model_name: str) -> Path | None:
    try:
        source = resolve_model_dir(model_name) / "tunesmith_source.json"
    except TunesmithError:
        return None
    return Path(json.loads(source.read_text())["gguf"]) if source.exists() else None
