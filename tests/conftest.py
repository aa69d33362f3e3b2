"""Shared fixtures: a tiny BPE tokenizer with a ChatML template and a tiny random Llama, built here (seconds)."""
from __future__ import annotations

import json
import random
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The recipes' public data sets (`tunesmith data get`), read through the setting users have: this project's checkout
# sits beside a copy of them (../shared/data, laid out as a data folder); elsewhere the tests that need one skip.
_PROJECT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")
if os.path.isdir(_PROJECT_DATA):
    os.environ.setdefault("TUNESMITH_DATA_DIR", os.path.normpath(_PROJECT_DATA))

import pytest  # noqa: E402
import torch  # noqa: E402

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = ["Summarize what the function does.", "Return the sum of two numbers.", "Open a file and read it.",
          "The quick brown fox jumps over the lazy dog.", "Question: what is two plus two? Answer: four.",
          "### Instruct: ### Output: ### End", "Below is an instruction that describes a task.",
          "def add(a, b): return a + b", "hello world, how are you today?"] * 20


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<unk>", pad_token="<|im_end|>")
    tok.chat_template = CHATML
    return tok


def make_tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama")
    model = make_tiny_llama(len(tiny_tokenizer))
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def instruction_file(tmp_path):
    rows = [{"instruction": f"Summarize what f{i} does.", "input": f"It adds {i} and {i + 1} and returns the sum.",
             "output": f"Return the sum of {i} and {i + 1}."} for i in range(40)]
    return write_jsonl(tmp_path / "train.jsonl", rows)


@pytest.fixture(autouse=True)
def private_data_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own tokenized-data cache (never the user's)."""
    monkeypatch.setenv("TUNESMITH_DATA_CACHE", str(tmp_path_factory.mktemp("data-cache")))


WORDS = {"positive": ["good", "great", "happy", "love"], "negative": ["bad", "awful", "sad", "hate"],
         "neutral": ["table", "chair", "window", "paper"]}


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, tiny_tokenizer):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-bert")
    cfg = BertConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=128, pad_token_id=tiny_tokenizer.pad_token_id)
    BertModel(cfg).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def sentiment_file(tmp_path):
    rng = random.Random(0)
    rows = []
    for i in range(120):
        label = list(WORDS)[i % 3]
        words = [rng.choice(WORDS[label])] + [rng.choice(WORDS["neutral"]) for _ in range(rng.randint(1, 4))]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return write_jsonl(tmp_path / "sentiment.jsonl", rows)


@pytest.fixture(scope="session")
def wide_tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """bitsandbytes' CPU 4-bit kernels need rows of at least one 64-value block."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama-64")
    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path
