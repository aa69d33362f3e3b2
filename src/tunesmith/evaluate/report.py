"""`runs/NAME/report.html`: one self-contained page (images embedded, opens offline) that says at a
glance whether the fine-tune helped, then shows the evidence: metrics base vs tuned with deltas,
curves, the side-by-side outputs, the forgetting check, data, parameters, timings, environment
and the config. Built from the run's files (eval.json, metrics.jsonl, config.yaml and, after
`tunesmith eval`, evaluation.json), so `train` and `eval` both (re)write it. The PNGs are also
written next to it.
"""
from __future__ import annotations

import base64
import html
import json
import os
import platform
from pathlib import Path

from tunesmith.catalog import CAUSAL_SHOWS, Chart, TaskShows, Verdict, describe_task, lower_is_better
from tunesmith.evaluate.human import describe, judgements, summarize
from tunesmith.evaluate.side_by_side import rouge_applies
from tunesmith.objectives import generates
from tunesmith.run import RunDir
from tunesmith.run.files import read_jsonl, write_text_atomic

GOOD, BAD = "#1a7f37", "#cf222e"


def write_report(run_dir: Path) -> Path:
    run = RunDir(run_dir)
    summary = json.loads(run.summary.read_text())
    evaluation = json.loads(run.evaluation.read_text()) if run.evaluation.exists() else None
    rows = read_jsonl(run.metrics)
    config = run.config.read_text() if run.config.exists() else ""
    task = summary.get("task", "causal")
    shows = describe_task(task) or CAUSAL_SHOWS
    curves = _charts_plot(rows, [c for c in shows.charts if c.figure == "training"], run.plot("training"))
    rollouts = _charts_plot(rows, [c for c in shows.charts if c.figure == "rollouts"], run.plot("rl"))
    bars = _metrics_plot(summary, evaluation, run.plot("metrics"))
    verdict, good = _verdict(summary, evaluation, shows)
    parts = [f"<h1>{html.escape(run.name)}</h1>",
             f"<p class='sub'>{html.escape(summary['method'])} on {html.escape(str(summary['model']))} &middot; "
             f"task: {html.escape(summary.get('task', 'causal'))}</p>",
             f"<div class='verdict' style='border-color:{GOOD if good else BAD}'>{verdict}</div>",
             "<h2>Metrics: base vs tuned</h2>", _metrics_table(summary, evaluation, task)]
    if summary.get("teacher"):
        parts += ["<h2>Distillation: teacher vs student</h2>", _teacher_table(summary)]
    if bars:
        parts.append(_img(bars, "metrics base vs tuned"))
    if curves:
        parts += ["<h2>Training curves</h2>", _img(curves, "loss, learning rate, tokens/s")]
    if rollouts:
        parts += ["<h2>Rollouts</h2>", _img(rollouts, "reward, groups with equal rewards, length, entropy and KL")]
    side = (evaluation or {}).get("side_by_side") or summary.get("side_by_side") or []
    if side:
        parts += ["<h2>Side by side</h2>", _side_by_side(side, rouge_applies(side, generates(task)))]
    human = summarize(judgements(run.path))
    if human.get("n"):
        parts += ["<h2>Human evaluation (blind A/B)</h2>", f"<p>{html.escape(describe(human))}</p>"]
    drift = (evaluation or {}).get("forgetting") or summary.get("forgetting")
    if drift:
        parts += ["<h2>Forgetting check</h2>", _forgetting(drift)]
    parts += ["<h2>Run</h2>", _facts(summary), "<h2>Config</h2>", f"<pre>{html.escape(config)}</pre>"]
    page = PAGE.format(title=html.escape(run.name), body="\n".join(parts))
    write_text_atomic(run.report, page)
    return run.report


def _verdict(summary: dict, evaluation: dict | None, shows: TaskShows = CAUSAL_SHOWS) -> tuple[str, bool]:
    before, after = summary.get("before") or {}, summary.get("after") or {}
    claims, good = [], True
    claim = _claim(shows.verdict, before, after)
    if claim:
        claims.append(claim[0])
        good = claim[1]
    against = ((evaluation or {}).get("tuned_against") or {}).get("base")
    if against and shows.evaluates == "rewarded generation":  # the answers' rewards, per example
        claims.append(f"on {evaluation['examples']} examples the tuned model's reward is higher on {against['won']}, lower on "
                      f"{against['lost']} (sign test p = {against['p_value']})")
    K = before.get("headroom_samples")
    if K and f"headroom_pass_at_{K}" in before:  # measured before the first step (objectives/headroom.py)
        claims.append(f"headroom before training ({before['headroom_prompts']} prompts): pass@1 "
                      f"{before['headroom_pass_at_1']:.1%}, pass@{K} {before[f'headroom_pass_at_{K}']:.1%}")
    gen = (evaluation or {}).get("metrics")
    if gen and "base" in gen and "tuned" in gen and "rougeL" in gen["tuned"]:
        paired = (((evaluation or {}).get("rouge_against") or {}).get("base") or {}).get("rougeL")
        claims.append(f"ROUGE-L against the references {gen['base']['rougeL']:.1f} &rarr; <b>{gen['tuned']['rougeL']:.1f}</b>"
                      + (f" (per example {paired['mean_difference']:+.2f}, 95 % paired bootstrap "
                         f"{paired['mean_difference_ci95'][0]:+.2f} to {paired['mean_difference_ci95'][1]:+.2f})" if paired else ""))
        good = good and gen["tuned"]["rougeL"] > gen["base"]["rougeL"]
    drift = (evaluation or {}).get("forgetting") or summary.get("forgetting")
    if drift:
        claims.append("general behaviour " + ("<b style='color:%s'>drifted</b>" % BAD if drift["drifted"] else "kept")
                      + f" (perplexity on general text {drift['ppl_change_pct']:+.1f}%, KL {drift['mean_kl']:.2f} nats/token)")
    head = "The fine-tune helped." if good else "The fine-tune did not clearly help."
    return f"<b>{head}</b> " + "; ".join(claims) + ".", good


def _claim(v: Verdict, before: dict, after: dict) -> tuple[str, bool] | None:
    """The task's own claim, `label before -> after (details; note)`, and whether it says the fine-tune helped."""
    a, b = after.get(v.metric), before.get(v.metric, v.before_default)
    if a is None or b is None:
        return None
    parts = [f"{a / b - 1:+.0%}"] if v.change and b else []
    for d in v.details:
        keys = [k for k in after if k.startswith(d.key)] if d.key.endswith("_") else [d.key]
        each = [f"{(d.label or k.removeprefix(d.key))} {before[k]:{d.fmt}} &rarr; {after[k]:{d.fmt}}{d.unit}" for k in keys
                if after.get(k) is not None and before.get(k) is not None]
        if each:
            parts.append(", ".join(each))
    if v.note:
        parts.append(v.note)
    good = a > 0.5 if v.good == "above chance" else a < b if v.good == "falls" else a > b
    return f"{v.label} {b:{v.fmt}} &rarr; <b>{a:{v.fmt}}</b>" + (f" ({'; '.join(parts)})" if parts else ""), good


def _metrics_table(summary: dict, evaluation: dict | None, task: str = "causal") -> str:
    rows = []
    before, after = summary.get("before") or {}, summary.get("after") or {}
    for k in after:
        if k in before and isinstance(after[k], (int, float)) and not k.endswith(("_tokens", "_examples", "_pairs")):
            rows.append((f"held-out {k.removeprefix('eval_')}", before[k], after[k], lower_is_better(k, task)))
    gen = (evaluation or {}).get("metrics") or {}
    for k, v in (gen.get("tuned") or {}).items():
        if k in (gen.get("base") or {}) and not k.endswith("_pairs"):
            rows.append((f"{k} ({evaluation.get('examples', '?')} examples)", gen["base"][k], v, False))
    out = ["<table><tr><th>metric</th><th>base</th><th>tuned</th><th>change</th></tr>"]
    for name, b, t, lower in rows:
        delta = t - b
        better = (delta < 0) if lower else (delta > 0)
        color = GOOD if better else (BAD if delta else "#555")
        out.append(f"<tr><td>{html.escape(name)}</td><td>{b:.4g}</td><td><b>{t:.4g}</b></td>"
                   f"<td style='color:{color}'>{delta:+.4g}</td></tr>")
    return "".join(out) + "</table>"


def _teacher_table(s: dict) -> str:
    t, before, after = s["teacher"], s.get("before") or {}, s.get("after") or {}
    keys = [k for k in t if isinstance(t[k], (int, float)) and not k.endswith(("_tokens", "_examples"))]
    rows = "".join(f"<tr><td>{html.escape(k.removeprefix('eval_'))}</td><td>{before.get(k, float('nan')):.4g}</td>"
                   f"<td><b>{after.get(k, float('nan')):.4g}</b></td><td>{t[k]:.4g}</td></tr>" for k in keys)
    return ("<table><tr><th>held-out metric</th><th>untrained student</th><th>trained student</th><th>teacher</th></tr>"
            f"{rows}</table><p>Student trainable parameters: {s['params']['trainable']:,} of {s['params']['total']:,}; "
            f"student training speed {s['tok_s']:.0f} tokens/s.</p>")


def _side_by_side(rows: list[dict], generated: bool = True) -> str:
    """`generated=False`: the cells are a classifier's labels, a reward model's scores or answers to prompts without a
    reference: no ROUGE-L under them."""
    names = [k[: -len("_rougeL")] for k in rows[0] if k.endswith("_rougeL")]
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    out = [f"<table class='sbs'><tr><th>input</th><th>reference</th>{head}</tr>"]
    for r in rows:
        cells = "".join(f"<td>{html.escape(r[n])}<div class='score'>{_cell_score(r, n, generated)}</div></td>" for n in names)
        out.append(f"<tr><td>{html.escape(r['input'][:600])}</td><td>{html.escape(r['reference'])}</td>{cells}</tr>")
    return "".join(out) + "</table>"


def _cell_score(row: dict, name: str, generated: bool) -> str:
    capped = "" if row.get(name + "_stopped", True) else " &middot; hit the length cap"
    return f"ROUGE-L {row[name + '_rougeL']:.1f}{capped}" if generated else capped


def _forgetting(d: dict) -> str:
    color = BAD if d["drifted"] else GOOD
    return (f"<p>On {d['texts']} short general texts unlike the training data ({d['tokens']} tokens): perplexity "
            f"{d['base_ppl']:.2f} (base) &rarr; {d['tuned_ppl']:.2f} (tuned), <span style='color:{color}'>"
            f"{d['ppl_change_pct']:+.1f}%</span>; mean KL(base || tuned) {d['mean_kl']:.3f} nats/token. "
            f"Flagged when perplexity rises more than {d['limits']['ppl_rise_pct']:.0f}% or KL exceeds {d['limits']['kl']}: "
            f"<b style='color:{color}'>{'drifted' if d['drifted'] else 'within limits'}</b>.</p>")


def _facts(s: dict) -> str:
    data = s.get("data", {})
    tr = data.get("train", {})
    items = [("trainable parameters", f"{s['params']['trainable']:,} of {s['params']['total']:,} ({s['params']['percent']:.3g}%)"),
             ("data", f"{data.get('format')} format, {data.get('records')} records; train {tr.get('kept')} examples, "
                      f"{tr.get('tokens', 0):,} tokens ({100 * tr.get('label_share', 0):.0f}% trained), "
                      f"val {data.get('val', {}).get('kept')}; dropped over-long {tr.get('dropped_overlong')}"),
             ("training", f"{s['steps']} steps, {s['tokens']:,} tokens in {s['train_seconds']:.0f} s ({s['tok_s']:.0f} tok/s)"
                          + (f", resumed from step {s['resumed_from']}" if s.get("resumed_from") else "")),
             ("time budget", f"{s['budget_minutes']:g} min of training bought {s['steps']} steps, {s.get('examples', 0):,} examples "
                             f"({s.get('epochs', 0):.2f} epochs), {s['tokens']:,} tokens" if s.get("budget_minutes") else "none (fixed steps)"),
             ("wall time", f"{s['wall_seconds']:.0f} s including loading, evaluation and saving" if s.get("wall_seconds")
                           else "not recorded (the closing evaluation was completed later by tunesmith eval)"),
             ("environment", f"{platform.platform()}, Python {platform.python_version()}, {s.get('threads')} threads, "
                             f"torch {_version('torch')}, transformers {_version('transformers')}, peft {_version('peft')}")]
    return "<table>" + "".join(f"<tr><td>{k}</td><td>{html.escape(str(v))}</td></tr>" for k, v in items) + "</table>"


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "?"


def _charts_plot(rows: list[dict], charts: list[Chart], path: Path) -> Path | None:
    """One figure of the declared charts side by side, each over the metrics.jsonl rows that have its first curve."""
    drawn = [(c, [r for r in rows if r.get(c.curves[0].key) is not None and not (c.skip and r.get(c.skip))]) for c in charts]
    if not drawn or not drawn[0][1]:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(drawn), figsize=(13 if len(drawn) <= 3 else 4 * len(drawn), 3.4), squeeze=False)
    for ax, (chart, steps) in zip(axes[0], drawn):
        lines = 0
        for curve in chart.curves:
            for key, label in _keys(curve, steps or rows):
                points = [r for r in (rows if curve.held_out else steps) if r.get(key) is not None
                          and not (chart.skip and r.get(chart.skip))]
                lines += _draw(ax, curve, [r["step"] for r in points], [r[key] for r in points], label, len(chart.curves) > 1)
        if chart.share:
            ax.set_ylim(-0.02, 1.02)
        ax.set_title(chart.title)
        ax.set_xlabel("step")
        if lines > 1:
            ax.legend(fontsize=7)
    return _save(fig, plt, path)


def _keys(curve, rows: list[dict]) -> list[tuple[str, str]]:
    """(key, label) of each line a curve draws: one, or one per key its `*` matches (labelled with the matched part)."""
    if "*" not in curve.key:
        return [(curve.key, curve.label)]
    head, tail = curve.key.split("*", 1)
    keys = dict.fromkeys(k for r in rows for k in r if k.startswith(head) and k.endswith(tail) and len(k) > len(head + tail))
    return [(k, curve.label.replace("*", k[len(head): len(k) - len(tail)])) for k in keys]


def _draw(ax, curve, x: list, y: list, label: str, several: bool) -> int:
    if not x:
        return 0
    if curve.held_out:
        ax.plot(x, y, "o-", color="#c0392b", label=label)
        return 1
    ax.plot(x, y, color="#9ab" if curve.smooth else None, lw=1 if curve.smooth or several else 2,
            linestyle="--" if curve.dashed else "-", label=label)
    if curve.smooth and len(y) >= 5:
        k = max(2, len(y) // 10)
        smooth = [sum(y[max(0, i - k + 1): i + 1]) / len(y[max(0, i - k + 1): i + 1]) for i in range(len(y))]
        ax.plot(x, smooth, color="#1f4e79", lw=2, label=label.replace(" (per step)", "") + " (smoothed)")
        return 2
    return 1


def _metrics_plot(summary: dict, evaluation: dict | None, path: Path) -> Path | None:
    gen = (evaluation or {}).get("metrics") or {}
    before, after = summary.get("before") or {}, summary.get("after") or {}
    pairs = {k: (gen["base"][k], gen["tuned"][k]) for k in ("rouge1", "rouge2", "rougeL", "bleu", "chrf", "meteor")
             if k in gen.get("tuned", {}) and k in gen.get("base", {})}
    for k in ("eval_accuracy", "eval_f1", "eval_token_accuracy"):
        if k in after and k in before:
            pairs[k.removeprefix("eval_")] = (100 * before[k], 100 * after[k])
    for k in ("eval_seq_logp_accuracy", "eval_logp_accuracy"):  # preference pairs (`tunesmith eval` of a DPO run)
        if k in gen.get("tuned", {}) and k in gen.get("base", {}):
            pairs[k.removeprefix("eval_")] = (100 * gen["base"][k], 100 * gen["tuned"][k])
    if not pairs:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 * len(pairs) + 2.5, 3.2))
    xs = range(len(pairs))
    ax.bar([i - 0.2 for i in xs], [v[0] for v in pairs.values()], 0.4, label="base", color="#b0b7c3")
    ax.bar([i + 0.2 for i in xs], [v[1] for v in pairs.values()], 0.4, label="tuned", color="#1f4e79")
    ax.set_xticks(list(xs), list(pairs))
    ax.set_ylabel("score (0-100)")
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, plt, path: Path) -> Path:
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _img(path: Path, alt: str) -> str:
    return f"<img alt='{alt}' src='data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}'>"


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title} - tunesmith report</title>
<style>
body {{ font: 15px/1.45 system-ui, sans-serif; max-width: 1250px; margin: 24px auto; padding: 0 16px; color: #1f2328; }}
h1 {{ margin-bottom: 0; }} .sub {{ color: #57606a; margin-top: 4px; }}
.verdict {{ border-left: 6px solid; background: #f6f8fa; padding: 12px 16px; font-size: 17px; margin: 16px 0; }}
table {{ border-collapse: collapse; margin: 8px 0 16px; }} td, th {{ border: 1px solid #d0d7de; padding: 5px 9px; vertical-align: top; text-align: left; }}
th {{ background: #f6f8fa; }} .sbs td {{ max-width: 300px; font-size: 13px; white-space: pre-wrap; }}
.score {{ color: #57606a; font-size: 12px; margin-top: 4px; }} img {{ max-width: 100%; }}
pre {{ background: #f6f8fa; padding: 10px; overflow-x: auto; font-size: 12px; }}
</style></head><body>
{body}
</body></html>
"""
