"""Knowledge distillation: the loss equals the KL by hand, and teacher -> student runs end to end
(logits and sequence modes, causal and classification)."""
import pytest
import torch
import torch.nn.functional as F

from tunesmith.config import DistillConfig
from tunesmith.errors import TunesmithError
from tunesmith.objectives.distill import distill_terms, sparse_distill_terms
from tunesmith.train.loop import train
from test_train import tiny_cfg


def test_loss_at_t1_alpha0_is_the_kl_by_hand():
    torch.manual_seed(0)
    s, t = torch.randn(7, 11), torch.randn(7, 11)
    y = torch.randint(0, 11, (7,))
    p_t, p_s = t.softmax(-1), s.softmax(-1)
    forward = (p_t * (p_t.log() - p_s.log())).sum()
    reverse = (p_s * (p_s.log() - p_t.log())).sum()
    assert torch.allclose(distill_terms(s, t, y, DistillConfig(alpha=0, temperature=1)), forward, atol=1e-5)
    assert torch.allclose(distill_terms(s, t, y, DistillConfig(alpha=0, temperature=1, kl="reverse")), reverse, atol=1e-5)
    assert torch.allclose(distill_terms(s, t, y, DistillConfig(alpha=1)), F.cross_entropy(s, y, reduction="sum"))
    t2 = DistillConfig(alpha=0, temperature=2)
    soft = (F.softmax(t / 2, -1) * (F.log_softmax(t / 2, -1) - F.log_softmax(s / 2, -1))).sum() * 4
    assert torch.allclose(distill_terms(s, t, y, t2), soft, atol=1e-5)


def test_top_k_loss_with_every_token_is_the_full_loss_and_renormalises_otherwise():
    torch.manual_seed(0)
    s, t = torch.randn(7, 11), torch.randn(7, 11)
    y = torch.randint(0, 11, (7,))
    cfg = DistillConfig(alpha=0.3, temperature=2)
    top = t.topk(11, dim=-1)
    assert torch.allclose(sparse_distill_terms(s, top.indices, top.values, y, cfg), distill_terms(s, t, y, cfg), atol=1e-5)
    top3 = t.topk(3, dim=-1)  # k=3: teacher renormalised over its 3 ids, student log-probs over all 11 at those ids
    p_t = F.softmax(top3.values / 2, -1)
    log_s = F.log_softmax(s / 2, -1).gather(-1, top3.indices)
    by_hand = 0.3 * F.cross_entropy(s, y, reduction="sum") + 0.7 * 4 * (p_t * (p_t.log() - log_s)).sum()
    assert torch.allclose(sparse_distill_terms(s, top3.indices, top3.values, y, cfg), by_hand, atol=1e-5)


@pytest.fixture
def teacher_run(tmp_path, tiny_model_dir, instruction_file):
    return train(tiny_cfg(tmp_path, tiny_model_dir, instruction_file, "train.max_steps=20", "output.name=teacher")).run_dir


@pytest.mark.parametrize("mode", ["logits", "sequence"])
def test_student_learns_from_a_tuned_teacher(tmp_path, tiny_model_dir, instruction_file, teacher_run, mode):
    s = train(tiny_cfg(tmp_path, tiny_model_dir, instruction_file, "method.r=4", "train.max_steps=10", "output.name=student",
                       f"distill.teacher={teacher_run}", f"distill.mode={mode}")).summary
    assert s["teacher"]["eval_loss"] < s["before"]["eval_loss"]  # the teacher is better than the untrained student
    assert s["after"]["eval_loss"] < s["before"]["eval_loss"]
    assert "Distillation: teacher vs student" in (tmp_path / "runs" / "student" / "report.html").read_text()


def test_logit_distillation_needs_a_shared_tokenizer(tmp_path, tiny_model_dir, instruction_file, tiny_tokenizer):
    from transformers import AutoTokenizer
    other = tmp_path / "other"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_tokens(["<brand-new>"])
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(other)
    tok.save_pretrained(other)
    with pytest.raises(TunesmithError, match="share a tokenizer.*distill.mode=sequence"):
        train(tiny_cfg(tmp_path, tiny_model_dir, instruction_file, f"distill.teacher={other}"))


def test_classification_distillation(tmp_path, tiny_bert_dir, sentiment_file):
    from test_classification import cls_cfg
    teacher = train(cls_cfg(tmp_path, tiny_bert_dir, sentiment_file, "method.name=full", "train.lr=1e-3", "output.name=t")).run_dir
    s = train(cls_cfg(tmp_path, tiny_bert_dir, sentiment_file, "method.name=lora", "output.name=s",
                      f"distill.teacher={teacher}")).summary
    assert "eval_accuracy" in s["teacher"] and s["after"]["eval_loss"] < s["before"]["eval_loss"]


def test_top_k_cache_matches_on_the_fly_distillation(tmp_path, tiny_model_dir, instruction_file, teacher_run):
    """With k = the whole (tiny) vocabulary, distilling from the cache follows the on-the-fly run's loss curve
    (up to the cache's float16 logits); the cache is built once and reused on resume-like reruns."""
    import json

    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(tiny_model_dir).vocab_size
    common = ["method.r=4", "train.max_steps=6", "data.val_size=8", "eval.samples=0", f"distill.teacher={teacher_run}",
              "distill.alpha=0.2"]
    fly = train(tiny_cfg(tmp_path, tiny_model_dir, instruction_file, *common, "output.name=fly")).run_dir
    cached = train(tiny_cfg(tmp_path, tiny_model_dir, instruction_file, *common, "output.name=cached",
                            f"distill.top_k={vocab}")).run_dir
    rows = lambda run: [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    for a, b in zip(rows(fly), rows(cached)):
        assert abs(a["loss"] - b["loss"]) < 2e-3, (a, b)
    assert json.loads((cached / "teacher_topk" / "done.json").read_text())["k"] == vocab
    small = train(tiny_cfg(tmp_path, tiny_model_dir, instruction_file, *common, "output.name=k4", "distill.top_k=4")).summary
    assert small["after"]["eval_loss"] < small["before"]["eval_loss"]
    assert (tmp_path / "runs" / "k4" / "teacher_topk" / "ids.npy").stat().st_size < 8 * 4 * 10_000
