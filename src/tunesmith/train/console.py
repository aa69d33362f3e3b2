"""What a training run prints about itself besides its progress: the data it read, and what it reports when it
finishes (held-out before -> after, the side-by-side score, the forgetting check)."""
from __future__ import annotations

from tunesmith.assemble import Run
from tunesmith.evaluate.side_by_side import mean_score, rouge_applies
from tunesmith.objectives import Objective


def data_lines(run: Run) -> list[str]:
    """The run's data: format, counts kept and dropped, tokens and the share trained (and a classifier's labels)."""
    st = run.data.stats
    lines = [f"data: {st['format']} format, {st['records']} records -> train {st['train']['kept']} / val {st['val']['kept']} "
             f"(dropped {st['train']['dropped_overlong'] + st['val']['dropped_overlong']} over {st['max_length']} tokens, "
             f"truncated {st['train']['truncated']}); train tokens {st['train']['tokens']}, "
             f"of which trained {st['train']['label_tokens']} ({100 * st['train']['label_share']:.0f}%)"
             + (" [tokenized data from cache]" if "from_cache" in st else "")]
    for j in st.get("judgements", ()):
        lines.append(f"judgements: {j['file']}: {j['judgements']} judgements -> {j['pairs']} pairs; dropped "
                     f"{j['dropped_ties']} ties, {j['dropped_identical']} between identical answers, "
                     f"{j['dropped_unusable']} unusable lines"
                     + (f" (first: {j['unusable_samples'][0]})" if j["unusable_samples"] else ""))
    if st.get("label_counts"):  # a classifier's labels, as the data declared them
        lines.append(f"task: {run.task} into {len(st['labels'])} labels: " + ", ".join(
            f"{name} {n}" for name, n in st["label_counts"]["train"].items()))
    return lines


def result_lines(objective: Objective, before: dict, after: dict, rows: list, drift: dict | None) -> list[str]:
    """What a finished run reports: held-out before -> after, the side-by-side score, the forgetting check."""
    lines = objective.results(before, after)
    if rows and rouge_applies(rows, objective.generates):
        lines.append(f"side-by-side mean ROUGE-L: base {mean_score(rows, 'base'):.1f} -> tuned {mean_score(rows, 'tuned'):.1f}")
    if drift:
        lines.append(f"forgetting check on {drift['texts']} general texts: perplexity {drift['base_ppl']:.2f} -> "
                     f"{drift['tuned_ppl']:.2f} ({drift['ppl_change_pct']:+.1f}%), mean KL(base||tuned) "
                     f"{drift['mean_kl']:.3f} nats/token" + (" -- DRIFTED beyond the limits" if drift["drifted"] else " -- within limits"))
    return lines
