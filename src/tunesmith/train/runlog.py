"""What a run writes as it goes: the log (terminal + train.log) and metrics.jsonl."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm

from tunesmith.train.rundir import write_text_atomic


def progress_bar(total: int, desc: str | None, unit: str, disable: bool = False, initial: int = 0) -> tqdm:
    """A tqdm bar on stderr: redrawn every second on a terminal, a line every 30 s when stderr is a log file."""
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, disable=disable,
                mininterval=1.0 if sys.stderr.isatty() else 30.0)


class RunLog:
    """Prints to the terminal and appends to runs/<name>/train.log (kept in memory until the run dir exists)."""

    def __init__(self, enabled: bool = True):
        self.fh, self.pending, self.enabled = None, [], enabled

    def attach(self, path: Path) -> None:
        self.fh = open(path, "a", encoding="utf-8")
        self.fh.writelines(line + "\n" for line in self.pending)
        self.fh.flush()

    def __call__(self, msg: str) -> None:
        if not self.enabled:
            return
        tqdm.write(msg)
        if self.fh is None:
            self.pending.append(msg)
            return
        self.fh.write(msg + "\n")
        self.fh.flush()


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """On resume: forget rows logged after the checkpoint (those steps run again)."""
    rows = read_metrics(path)
    if not rows and not path.exists():
        return
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= step))


def read_metrics(path: Path) -> list[dict]:
    """The rows of metrics.jsonl; a line torn by a crash mid-write is skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def metrics_line(m: dict) -> str:
    """One line of held-out metrics, whichever task produced them."""
    if "eval_reward_accuracy" in m:
        return (f"preference loss {m['eval_loss']:.4f}, reward accuracy {m['eval_reward_accuracy']:.3f}, margin "
                f"{m['eval_reward_margin']:.3f}, log-prob accuracy {m['eval_seq_logp_accuracy']:.3f} "
                f"(per token {m['eval_logp_accuracy']:.3f})")
    if "eval_accuracy" in m:
        return f"accuracy {m['eval_accuracy']:.3f}, macro-F1 {m['eval_f1']:.3f}, loss {m['eval_loss']:.4f}"
    return f"held-out loss {m.get('eval_loss', float('nan')):.4f}, token accuracy {m.get('eval_token_accuracy', float('nan')):.3f}"


def result_lines(task: str, before: dict, after: dict, rows: list, drift: dict | None) -> list[str]:
    """What a finished run reports: held-out before -> after, the side-by-side score, the forgetting check."""
    from tunesmith.evaluate.side_by_side import mean_score

    lines = []
    if before and after and task == "dpo":
        lines.append(f"held-out pairs: preference accuracy by log-prob {before['eval_seq_logp_accuracy']:.3f} -> "
                     f"{after['eval_seq_logp_accuracy']:.3f}, per token {before['eval_logp_accuracy']:.3f} -> "
                     f"{after['eval_logp_accuracy']:.3f}; reward accuracy {after['eval_reward_accuracy']:.3f}, "
                     f"margin {after['eval_reward_margin']:.3f}")
    elif before and after and task == "classification":
        lines.append(f"held-out: accuracy {before['eval_accuracy']:.3f} -> {after['eval_accuracy']:.3f}, macro-F1 "
                     f"{before['eval_f1']:.3f} -> {after['eval_f1']:.3f}, loss {before['eval_loss']:.4f} -> {after['eval_loss']:.4f}")
    elif before and after:
        lines.append(f"held-out loss on responses: {before['eval_loss']:.4f} -> {after['eval_loss']:.4f} "
                     f"(perplexity {before['eval_ppl']:.2f} -> {after['eval_ppl']:.2f}); "
                     f"token accuracy {before['eval_token_accuracy']:.3f} -> {after['eval_token_accuracy']:.3f}")
    if rows and task != "classification":
        lines.append(f"side-by-side mean ROUGE-L: base {mean_score(rows, 'base'):.1f} -> tuned {mean_score(rows, 'tuned'):.1f}")
    if drift:
        lines.append(f"forgetting check on {drift['texts']} general texts: perplexity {drift['base_ppl']:.2f} -> "
                     f"{drift['tuned_ppl']:.2f} ({drift['ppl_change_pct']:+.1f}%), mean KL(base||tuned) "
                     f"{drift['mean_kl']:.3f} nats/token" + (" -- DRIFTED beyond the limits" if drift["drifted"] else " -- within limits"))
    return lines
