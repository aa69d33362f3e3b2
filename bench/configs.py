"""One benchmark configuration per process: python bench/configs.py NAME MODEL_DIR DATA_JSONL STEPS

  tunesmith       tunesmith LoRA (r32/a32 on q,k,v,o; dropout 0), 8 examples per step in passes of <= 1024 tokens
  tutorial        HF Trainer + PEFT LoRA (r32/a32/dropout 0.05 on q,k,v,o), pad to longest, labels = input_ids,
                  batch 4 x accumulation 2 (the classic tutorial recipe)
  trl             TRL SFTTrainer + the same LoRA, prompt/completion data -> completion-only loss, padding-free
  tunesmith_2proc the same as tunesmith on 2 single-threaded data-parallel processes (--nproc 2, 4 examples each);
                  peak RSS reported as 2 x the larger process
  tunesmith_full  tunesmith full fine-tuning (embeddings trained too, as in tutorial_full), lr 5e-5
  tutorial_full   the tutorial recipe with full fine-tuning, lr 5e-5

All: fp32, lr 2e-4 for LoRA, effective batch 8, one epoch over steps*8 rows, the same rows and the same
held-out eval (common.py). Prints one `RESULT {json}` line.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

if sys.argv[1].startswith("tunesmith"):  # tunesmith's own thread policy (its CLI sets the same)
    from tunesmith.native_env import set_native_defaults

    set_native_defaults()
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the issue measured the tutorial and TRL recipes
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402


def run_tunesmith(model_dir, train_rows, eval_rows, steps, full, processes=1):
    import resource
    import subprocess

    from tunesmith.config import dump_yaml, load_config
    from tunesmith.methods.load import load_model
    from tunesmith.train.loop import train

    tmp = tempfile.mkdtemp(prefix="bench-tunesmith-")
    for name, rows in (("train", train_rows), ("val", eval_rows)):
        with open(os.path.join(tmp, f"{name}.jsonl"), "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    method = (["method.name=full", "method.freeze_embeddings=false", "train.lr=5e-5"] if full else
              ["method.name=lora", f"method.r={common.LORA['r']}", f"method.alpha={common.LORA['alpha']}",
               f"method.target_modules={common.LORA['targets']}", f"train.lr={common.LR}"])
    cfg = load_config(None, [f"model.name={model_dir}", f"data.path={tmp}/train.jsonl", f"data.val_path={tmp}/val.jsonl",
                             f"data.max_length={common.MAX_LEN}", f"train.max_steps={steps}",
                             f"train.micro_batch_size={8 // processes}", "train.grad_accum=1", "train.warmup=0", "train.schedule=linear", "eval.max_examples=1",
                             "eval.samples=0", f"output.dir={tmp}", "output.name=run", *method])
    if processes == 1:
        result = train(cfg)
        seconds, rss, run_dir = result.summary["loop_seconds"], common.maxrss_mib(), result.run_dir
    else:
        path = Path(tmp) / "run.yaml"
        path.write_text(dump_yaml(cfg))
        subprocess.run([sys.executable, "-m", "tunesmith.cli.main", "train", str(path), "--nproc", str(processes)],
                       check=True, stdout=subprocess.DEVNULL)
        run_dir = Path(tmp) / "run"
        seconds = json.loads((run_dir / "eval.json").read_text())["loop_seconds"]
        rss = processes * resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest worker x N
    model = load_model(run_dir / "final", torch.float32)
    return seconds, rss, model


def _hf_tutorial(model_dir, train_rows, steps, full):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainingArguments
    from datasets import Dataset

    tok = AutoTokenizer.from_pretrained(model_dir)
    ds = Dataset.from_list([{"input_ids": common.chat_ids(tok, r)[0]} for r in train_rows])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if not full:
        model = get_peft_model(model, LoraConfig(r=common.LORA["r"], lora_alpha=common.LORA["alpha"], lora_dropout=0.05,
                                                 target_modules=common.LORA["targets"], task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="bench-tutorial-"), per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, max_steps=steps, learning_rate=5e-5 if full else common.LR,
                             lr_scheduler_type="linear", logging_steps=1, save_strategy="no", report_to="none",
                             disable_tqdm=True, use_cpu=True, dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    with common.Clock() as c:
        trainer.train()
    return c.seconds, common.maxrss_mib(), trainer.model


def _trl(model_dir, train_rows, steps):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ds = Dataset.from_list([{"prompt": common.messages(r)[:1], "completion": common.messages(r)[1:]} for r in train_rows])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = SFTConfig(output_dir=tempfile.mkdtemp(prefix="bench-trl-"), per_device_train_batch_size=4,
                    gradient_accumulation_steps=2, max_steps=steps, learning_rate=common.LR, lr_scheduler_type="linear",
                    logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True,
                    dataloader_num_workers=0, seed=0, completion_only_loss=True, padding_free=True, max_length=None)
    peft_cfg = LoraConfig(r=common.LORA["r"], lora_alpha=common.LORA["alpha"], lora_dropout=0.05,
                          target_modules=common.LORA["targets"], task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft_cfg)
    with common.Clock() as c:
        trainer.train()
    return c.seconds, common.maxrss_mib(), trainer.model


def main():
    name, model_dir, data_file, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    from transformers import AutoConfig, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    train_rows, eval_rows = common.select_rows(tok, data_file, steps)
    full = name.endswith("_full")
    if name.startswith("tunesmith"):
        seconds, rss, model = run_tunesmith(model_dir, train_rows, eval_rows, steps, full, 2 if name.endswith("_2proc") else 1)
    elif name.startswith("tutorial"):
        seconds, rss, model = _hf_tutorial(model_dir, train_rows, steps, full)
    elif name == "trl":
        seconds, rss, model = _trl(model_dir, train_rows, steps)
    else:
        raise SystemExit(f"unknown configuration {name}")
    ids = [common.chat_ids(tok, r) for r in train_rows]
    real = sum(len(f) for f, _ in ids)
    trained_share = sum(len(f) - p for f, p in ids) / real
    mean_len = real / len(ids)
    flops = common.flops_per_token(AutoConfig.from_pretrained(model_dir), mean_len, trained_share, full) * real
    common.emit({"config": name, "steps": steps, "real_tokens": real, "train_seconds": round(seconds, 2),
                 "real_tok_s": round(real / seconds, 1), "peak_rss_mib": round(rss), "model_gflop": round(flops / 1e9, 1),
                 "achieved_gflops": round(flops / seconds / 1e9, 2),
                 "heldout_response_loss": round(common.heldout_response_loss(model, tok, eval_rows), 4),
                 "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
