"""Evaluation: metrics equal the libraries called by hand, `tunesmith eval` scores base and tuned
against references, the forgetting check, and the HTML report."""
import json

import pytest
import sacrebleu
import torch
from rouge_score import rouge_scorer

from tunesmith.cli.main import main
from tunesmith.evaluate.metrics import bleu_chrf, exact_match, rouge
from tunesmith.train.loop import train
from conftest import write_jsonl
from test_train import tiny_cfg

PRED = ["the cat sat on the mat", "a quick brown fox", "nothing in common"]
REFS = [["the cat is on the mat", "a cat sat on a mat"], ["the quick brown fox jumps"], ["entirely different words"]]


def test_rouge_and_bleu_match_the_libraries_by_hand():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    best = [max(scorer.score(r, p)["rougeL"].fmeasure for r in refs) for p, refs in zip(PRED, REFS)]
    assert rouge(PRED, REFS)["rougeL"] == round(100 * sum(best) / 3, 2)
    r1 = [max(scorer.score(r, p)["rouge1"].fmeasure for r in refs) for p, refs in zip(PRED, REFS)]
    assert rouge(PRED, REFS)["rouge1"] == round(100 * sum(r1) / 3, 2)
    streams = [[REFS[0][0], REFS[1][0], REFS[2][0]], [REFS[0][1], REFS[1][0], REFS[2][0]]]
    assert bleu_chrf(PRED, REFS)["bleu"] == round(sacrebleu.corpus_bleu(PRED, streams).score, 2)
    assert bleu_chrf(PRED, REFS)["chrf"] == round(sacrebleu.corpus_chrf(PRED, streams).score, 2)
    assert exact_match(["The cat", "dog"], [["the  cat"], ["cat"]]) == 50.0


def test_eval_command_scores_base_and_tuned_and_writes_the_report(tmp_path, tiny_model_dir, instruction_file, capsys):
    res = train(tiny_cfg(tmp_path, tiny_model_dir, instruction_file, "train.max_steps=15"))
    run = res.run_dir
    assert res.summary["forgetting"]["texts"] == 12 and "mean_kl" in res.summary["forgetting"]
    html = (run / "report.html").read_text()
    assert "Metrics: base vs tuned" in html and "data:image/png;base64," in html and "Forgetting check" in html
    # evaluate on a separate file with several references per record
    rows = [{"instruction": f"Summarize what f{i} does.", "output": f"Return the sum of {i} and {i + 1}.",
             "references": [f"Return the sum of {i} and {i + 1}.", f"Adds {i} to {i + 1}."]} for i in range(6)]
    data = write_jsonl(tmp_path / "eval.jsonl", rows)
    assert main(["eval", str(run), "--data", str(data), "-n", "4", "--max-new-tokens", "6"]) == 0
    ev = json.loads((run / "evaluation.json").read_text())
    assert ev["examples"] == 4 and set(ev["metrics"]) == {"base", "tuned"}
    for name in ("base", "tuned"):
        m = ev["metrics"][name]
        assert {"rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "chrf", "exact_match", "ends_on_its_own"} <= set(m)
        assert m["rougeL"] == rouge(ev["outputs"][name], ev["references"])["rougeL"]  # against the references
    assert ev["references"][0] == rows[0]["references"]
    assert ev["forgetting"]["drifted"] in (True, False)
    assert "rougeL (4 examples)" in (run / "report.html").read_text()
    paired = ev["rouge_against"]["base"]["rougeL"]  # per example: the same examples decide
    assert paired["mean_difference"] == pytest.approx(m["rougeL"] - ev["metrics"]["base"]["rougeL"], abs=0.01)
    low, high = paired["mean_difference_ci95"]
    assert low <= paired["mean_difference"] <= high and paired["won"] + paired["lost"] <= 4
    assert f"per example {paired['mean_difference']:+.2f}, 95 % paired bootstrap" in (run / "report.html").read_text()


def test_paired_bootstrap_interval_matches_the_normal_one_and_is_reproducible():
    import torch

    from tunesmith.evaluate.evaluation import paired_bootstrap

    diff = torch.randn(400, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    low, high = paired_bootstrap(diff)
    half = 1.96 * float(diff.std()) / 20
    assert low == pytest.approx(float(diff.mean()) - half, abs=0.02) and high == pytest.approx(float(diff.mean()) + half, abs=0.02)
    assert paired_bootstrap(diff) == (low, high)
    assert paired_bootstrap(torch.full((10,), 2.0, dtype=torch.float64)) == (2.0, 2.0)


def test_eval_of_a_classifier(tmp_path, tiny_bert_dir, sentiment_file, capsys):
    from test_classification import cls_cfg

    run = train(cls_cfg(tmp_path, tiny_bert_dir, sentiment_file, "method.name=full", "train.lr=1e-3")).run_dir
    assert main(["eval", str(run), "--data", str(sentiment_file), "-n", "40"]) == 0
    ev = json.loads((run / "evaluation.json").read_text())
    assert ev["task"] == "classification" and "eval_f1" in ev["metrics"]["tuned"]
    assert ev["metrics"]["majority class"]["eval_accuracy"] > 0.3
    # a second evaluation keeps the first: each one is numbered under evaluations/, evaluation.json is the latest
    assert main(["eval", str(run), "--data", str(sentiment_file), "-n", "20", "--no-base"]) == 0
    kept = sorted((run / "evaluations").iterdir())
    stem = f"{sentiment_file.parent.name}-{sentiment_file.stem}"
    assert [k.name for k in kept] == [f"001-{stem}-40.json", f"002-{stem}-20.json"]
    assert json.loads(kept[0].read_text()) == ev
    assert json.loads(kept[1].read_text()) == json.loads((run / "evaluation.json").read_text())
    assert json.loads(kept[1].read_text())["examples"] == 20


def test_eval_of_classifiers_keeps_predictions_and_pairs_the_runs(tmp_path, tiny_bert_dir, tiny_model_dir, sentiment_file):
    """Predicted labels are kept per example; `--runs` adds, per other run (here a decoder beside the encoder),
    the examples only one of the two gets right and the sign-test p-value of that split."""
    from scipy.stats import binomtest

    from test_classification import cls_cfg

    enc = train(cls_cfg(tmp_path / "a", tiny_bert_dir, sentiment_file, "method.name=full", "train.lr=1e-3")).run_dir
    dec = train(cls_cfg(tmp_path / "b", tiny_model_dir, sentiment_file, "method.name=lora", "train.max_steps=5")).run_dir
    assert main(["eval", str(enc), "--data", str(sentiment_file), "-n", "60", "--no-base", "--runs", str(dec)]) == 0
    ev = json.loads((enc / "evaluation.json").read_text())
    gold = ev["references"]
    assert len(gold) == 60 and set(gold) == {"negative", "neutral", "positive"}
    for name in ("tuned", dec.name):
        assert len(ev["outputs"][name]) == 60
        right = sum(o == g for o, g in zip(ev["outputs"][name], gold))
        assert right / 60 == pytest.approx(ev["metrics"][name]["eval_accuracy"], abs=1e-5)
    won = sum(t == g != o for t, o, g in zip(ev["outputs"]["tuned"], ev["outputs"][dec.name], gold))
    lost = sum(o == g != t for t, o, g in zip(ev["outputs"]["tuned"], ev["outputs"][dec.name], gold))
    paired = ev["tuned_against"][dec.name]
    assert (paired["won"], paired["lost"]) == (won, lost) and won + lost > 0
    assert paired["p_value"] == round(binomtest(won, won + lost).pvalue, 4)


def test_eval_prompts_each_generation_run_with_its_own_template(tmp_path, tiny_model_dir, instruction_file):
    """`--runs` beside a chat-template run: a run trained on a text template is prompted with that template."""
    from tunesmith.data.prepare import load_examples
    from tunesmith.data.render import render
    from tunesmith.evaluate.evaluation import _load
    from tunesmith.models.generate import Sampling, generate
    from tunesmith.models import load_tokenizer

    chat = train(tiny_cfg(tmp_path / "a", tiny_model_dir, instruction_file, "data.template=chat")).run_dir
    text = train(tiny_cfg(tmp_path / "b", tiny_model_dir, instruction_file, "data.template=alpaca")).run_dir
    assert main(["eval", str(chat), "--data", str(instruction_file), "-n", "6", "--no-base", "--runs", str(text),
                 "--max-new-tokens", "8"]) == 0
    kept = json.loads((chat / "evaluation.json").read_text())["outputs"][text.name]
    examples = load_examples(tiny_cfg(tmp_path, tiny_model_dir, instruction_file).data, str(instruction_file))[1]
    examples = examples[:: len(examples) // 6][:6]
    model, tok = _load(text / "final", torch.float32, torch.device("cpu")), load_tokenizer(text / "final")

    def outputs(template):
        prompts = [render(ex, template, tok, False, None).prompt for ex in examples]
        return [g.text for g in generate(model, tok, prompts, Sampling(max_new_tokens=8), add_special_tokens=template != "chat")]

    assert kept == outputs("alpaca")
    assert kept != outputs("chat")  # the prompt the first run's template would have given changes the answers


def test_batched_generation_keeps_the_prompt_order_and_matches_one_at_a_time(tiny_model_dir):
    """Prompts are batched by length internally; answers come back in input order, equal to one-by-one greedy.
    Beam search (eval.num_beams) returns one answer per prompt too."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.models.generate import Sampling, generate

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = ["a b c d e f g h", "x", "def f(): return 1", "the cat", "one two three four five six seven eight nine"]
    sampling = Sampling(max_new_tokens=6)
    together = generate(model, tok, prompts, sampling, batch_size=2)
    alone = [generate(model, tok, [p], sampling)[0] for p in prompts]
    assert [g.text for g in together] == [g.text for g in alone]
    beams = generate(model, tok, prompts, Sampling(max_new_tokens=6, num_beams=3), batch_size=2)
    assert len(beams) == len(prompts) and all(g.new_tokens <= 6 for g in beams)


def test_long_generations_show_progress_only_when_asked(tiny_model_dir, capsys):
    """`tunesmith eval` labels a progress bar per model (619 TL;DRs take ~10 minutes on 2 cores); chat and the
    side-by-side samples generate without one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.models.generate import Sampling, generate

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = ["a b c", "x", "the cat sat", "one two", "def f():"]
    generate(model, tok, prompts, Sampling(max_new_tokens=3), batch_size=2)
    assert capsys.readouterr().err == ""
    generate(model, tok, prompts, Sampling(max_new_tokens=3), batch_size=2, progress="tuned")
    err = capsys.readouterr().err
    assert "tuned: 100%" in err and "5/5" in err


def test_human_evaluation_statistics_match_scipy():
    from scipy.stats import binomtest

    from tunesmith.evaluate.human import sign_test, summarize, wilson

    for wins, losses in [(8, 2), (0, 5), (7, 7), (30, 12), (1, 0)]:
        assert sign_test(wins, losses) == pytest.approx(binomtest(wins, wins + losses, 0.5).pvalue)
        ci = binomtest(wins, wins + losses).proportion_ci(0.95, method="wilson")
        assert wilson(wins, wins + losses) == pytest.approx((ci.low, ci.high), abs=1e-9)
    rows = [{"a": "base", "b": "tuned", "winner": w} for w in ["b", "b", "a", "tie", "b"]]
    s = summarize(rows)
    assert (s["wins"], s["losses"], s["ties"], s["win_rate"]) == (3, 1, 1, 0.75)
    assert summarize([]) == {"n": 0}


def test_side_by_side_of_scores_or_labels_carries_no_rouge():
    """A reward model's or classifier's side-by-side cells are scores / labels: no ROUGE-L tag, no mean ROUGE-L line."""
    from tunesmith.evaluate.report import _side_by_side
    from tunesmith.evaluate.side_by_side import build_rows, format_table
    from tunesmith.models.generate import Generation

    rows = build_rows(["a prompt"], ["the chosen answer"],
                      {"base": [Generation("chosen +0.100, rejected +0.200 (wrong)", 0, True)],
                       "tuned": [Generation("chosen +2.000, rejected +1.000 (right)", 0, True)]})
    assert "ROUGE" not in format_table(rows, ["base", "tuned"], generated=False)
    assert "ROUGE" not in _side_by_side(rows, generated=False)
    assert "(right)" in format_table(rows, ["base", "tuned"], generated=False)
    assert "mean ROUGE-L vs reference" in format_table(rows, ["base", "tuned"])
    assert "ROUGE-L" in _side_by_side(rows)


def test_forgetting_kl_over_the_top_tokens_is_a_lower_bound_of_the_full_kl_and_never_negative():
    import torch

    from tunesmith.evaluate.forgetting import top_k_kl

    torch.manual_seed(0)
    logits = torch.randn(50, 200) * 2
    base = torch.log_softmax(logits, -1)
    for tuned in (torch.log_softmax(logits * 1.5, -1), torch.log_softmax(logits + torch.randn(50, 200), -1), base):
        full = (base.exp() * (base - tuned)).sum(-1)
        top = base.topk(8, dim=-1).indices
        b, t = base.gather(-1, top), tuned.gather(-1, top)
        ours = top_k_kl(b, t)
        assert (ours >= -1e-6).all() and (ours <= full + 1e-5).all()
    sharper = torch.log_softmax(logits * 1.5, -1)
    t = sharper.gather(-1, top)
    assert (b.exp() * (b - t)).sum(-1).mean() < 0  # the top-k terms alone: negative for a sharper model
    assert torch.allclose(top_k_kl(b, b), torch.zeros(50), atol=1e-6)
