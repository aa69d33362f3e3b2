"""The end of a run: the trained weights are on disk first, then they are measured.

`train` publishes final/ as soon as the last step ends and writes eval.json with what training did, in state
"trained" (evaluation incomplete). Then the closing evaluation (`close`): the tuned model's held-out metrics (with
`train.select_best`, the best evaluation's weights when they beat the last step's: final/ is published again with
them), its side-by-side outputs next to the base's, the forgetting check, then eval.json in state "finished" and
report.html. A signal or a crash during it leaves final/ and a run in state "trained", which `tunesmith eval RUN`
completes with the same code (`complete`). Its mirror at the start of a run is `open_baseline`: the base's held-out
metrics and outputs (and its reference for the forgetting check), measured before the first step and written to
baseline.json, which the closing evaluation compares the tuned model with.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from tunesmith.catalog import lower_is_better
from tunesmith.data.shapes import user_text
from tunesmith.errors import TunesmithError
from tunesmith.evaluate import forgetting
from tunesmith.evaluate.report import write_report
from tunesmith.evaluate.side_by_side import build_rows
from tunesmith.methods import get_method
from tunesmith.methods.load import save_prompt_format
from tunesmith.models.generate import Generation
from tunesmith.objectives import Objective
from tunesmith.run import RunDir
from tunesmith.run.files import append_jsonl, publish_dir, write_json_atomic

TRAINED, FINISHED = "trained", "finished"  # eval.json "state": evaluation incomplete / done


@dataclass
class Closing:
    run_dir: RunDir
    objective: Objective
    model: object
    last_step: int
    baseline: dict                       # "before" metrics and "base_outputs" (Generation each), measured before training
    base_general: dict | None            # the base on general text (forgetting check), or None
    measure: Callable[[object], dict]    # held-out metrics as training takes them (sharded over processes)
    save_final: Callable[[], None]       # publish final/ again from the model (with the best weights)
    load_best: Callable[[], None]        # best/'s weights into the model
    record: Callable[[dict], None] = lambda row: None  # a metrics.jsonl row
    select_best: str | None = None
    best: dict | None = None             # {"step", "value"} of the best evaluation during training
    main: bool = True                    # this process writes (rank 0)
    joins_forwards: bool = True          # this process takes part in generation (rank 0, or every rank under FSDP)
    log: Callable[[str], None] = print
    started: float | None = None         # time.perf_counter() when the run started: eval.json's wall_seconds
    result: dict = field(default_factory=dict)  # what close() measured: after, best, outputs, rows, drift


def sample_indices(n_val: int, samples: int) -> list[int]:
    """The held-out examples the side-by-side table shows: `samples` of them, spread over the split."""
    return sorted({i * n_val // samples for i in range(samples)}) if n_val and samples else []


def open_baseline(run_dir: RunDir, objective: Objective, model, tokenizer, measure: Callable[[object], dict],
                  record: Callable[[dict], None], resuming: bool, main: bool = True,
                  joins_forwards: bool = True) -> tuple[dict, dict | None]:
    """(baseline, base_general): the base's held-out metrics ("before") and side-by-side outputs ("base_outputs"), and
    the base on general text for the forgetting check (or None). Measured before the first step (the model without
    its adapter: prompt/prefix tuning start from non-neutral virtual tokens) and written to baseline.json, with the
    metrics as metrics.jsonl's step 0; a resumed run reads what its first launch measured."""
    if resuming:
        baseline = json.loads(run_dir.baseline.read_text())
        baseline["base_outputs"] = [Generation(**g) for g in baseline["base_outputs"]]
        return baseline, forgetting.load_base(run_dir.baseline_general)
    idx = sample_indices(len(objective.data.val.rendered), objective.cfg.eval.samples)  # spread over the split
    with _as_base(model):
        baseline = {"before": measure(model), "base_outputs": objective.samples(model, idx) if idx and joins_forwards else []}
        # the forgetting check's reference: the base model on general text unlike the training data
        base_general = forgetting.measure_base(model, tokenizer) if objective.checks_forgetting and joins_forwards else None
    if main:
        try:
            write_json_atomic(run_dir.baseline, {**baseline, "base_outputs": [asdict(g) for g in baseline["base_outputs"]]})
            if base_general:
                forgetting.save_base(run_dir.baseline_general, base_general)
        except Exception as e:  # before the first step: nothing trained is lost
            raise TunesmithError(f"could not write the base model's measurements into {run_dir}: "
                                 f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if baseline["before"]:
        record({"step": 0, **baseline["before"]})
    return baseline, base_general


def _as_base(model):
    """The model without its adapter (peft methods), for measuring the base in place."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


def improves(metric: str | None, record: dict, best: dict | None, task: str | None = None) -> bool:
    """Whether `record` beats `best` on `metric` (lower when the task declares it lower-is-better, `TaskSpec.
    lower_is_better`: losses and perplexity; higher otherwise); NaN never does. Without `task`, lower when any task
    declares it so."""
    if not metric or metric not in record or record[metric] is None or not math.isfinite(record[metric]):
        return False
    if best is None or best.get("value") is None or not math.isfinite(best["value"]):
        return True
    return record[metric] < best["value"] if lower_is_better(metric, task) else record[metric] > best["value"]


def close(c: Closing, summary: dict) -> dict:
    """The closing evaluation of a trained run (module docstring); `summary` is eval.json as training wrote it."""
    after, best = c.measure(c.model), c.best
    if best and not improves(c.select_best, after, best, c.objective.task):
        c.load_best()
        c.log(f"train.select_best: finishing with step {best['step']}'s weights ({c.select_best} {best['value']:.4f}; "
              f"the last step had {after.get(c.select_best, float('nan')):.4f})")
        if c.main:
            c.save_final()
        after = c.measure(c.model)
    elif best:  # the last step's weights beat every earlier evaluation: they are the best, and the ones kept
        best = {"step": c.last_step, "value": after[c.select_best]}
    if after:
        c.record({"step": c.last_step, **after})
    idx = sample_indices(len(c.objective.data.val.rendered), c.objective.cfg.eval.samples)
    tuned_outputs = c.objective.samples(c.model, idx) if idx and c.joins_forwards else []
    drift = forgetting.compare_to_base(c.model, c.base_general) if c.base_general and c.joins_forwards else None
    val = c.objective.data.val
    rows = build_rows([user_text(val.examples[i]) for i in idx], [val.rendered[i].reference for i in idx],
                      {"base": c.baseline["base_outputs"], "tuned": tuned_outputs}) if c.main else []
    c.result = {"after": after, "best": best, "side_by_side": rows, "forgetting": drift}
    if not c.main:
        return summary
    summary = {**summary, "state": FINISHED, **c.result}
    if c.started is not None:
        summary["wall_seconds"] = round(time.perf_counter() - c.started, 1)
    write_json_atomic(c.run_dir.summary, summary)
    write_report(c.run_dir.path)
    return summary


def write_final(folder: Path, model, tokenizer, cfg, task: str, objective: Objective, prompts,
                state_dict: dict | None = None) -> None:
    """What a run's final/ holds, as training publishes it and as the closing evaluation publishes it again with the
    best weights: the method's weights, how to prompt the model as it was trained, the objective's own files."""
    get_method(cfg.method.name).save(model, tokenizer, folder, cfg.method, task, state_dict)
    save_prompt_format(folder, prompts)
    objective.save(folder)


def complete(run_dir, log=print) -> dict:
    """`tunesmith eval` of a run in state "trained": its closing evaluation, interrupted, done now (one process)."""
    from tunesmith.assemble import assemble
    from tunesmith.config import load_config
    from tunesmith.methods.load import load_model, merge_adapter, prompt_format
    from tunesmith.models import pick_device
    from tunesmith.objectives import objective_for
    from tunesmith.run.lock import RunLock

    run_dir = RunDir(run_dir)
    with RunLock(run_dir.path).acquire("completing its evaluation"):
        summary = json.loads(run_dir.summary.read_text())
        cfg = load_config(str(run_dir.config))
        device = pick_device()
        run = assemble(cfg, device, with_model=False)
        objective = objective_for(run.task, cfg, run.data, run.tokenizer, run.precision.dtype)
        log(f"{run_dir}: trained, its closing evaluation incomplete: completing it")
        dtype, labels = run.precision.dtype, run.data.stats.get("labels")
        base = merge_adapter(load_model(run.model_dir, dtype, device, run.task, labels=labels))
        objective.prepare_measure(base)  # what measuring needs of the model before training (DPO's reference)
        del base
        model = load_model(run_dir.final, dtype, device, run.task, labels=labels)
        baseline = json.loads(run_dir.baseline.read_text())
        baseline["base_outputs"] = [Generation(**g) for g in baseline["base_outputs"]]
        prompts = prompt_format(run_dir.final)

        def save_final() -> None:
            publish_dir(run_dir.final, lambda folder: write_final(folder, model, run.tokenizer, cfg, run.task, objective, prompts))

        closing = Closing(run_dir, objective, model, summary["steps"], baseline, forgetting.load_base(run_dir.baseline_general),
                          lambda m: objective.measure(m, objective.val), save_final, lambda: load_weights(model, run_dir.best),
                          lambda row: append_jsonl(run_dir.metrics, row), cfg.train.select_best, summary.get("best"), log=log)
        return close(closing, summary)


def load_weights(model, folder) -> None:
    """A best/ folder's trainable tensors into `model` (one process)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in load_file(Path(folder) / "trainable.safetensors").items():
            params[name].copy_(value)


