"""Pre-flight plan: will this run fit in memory, and how long will it take?

Memory (bytes) = process baseline (Python, torch, transformers, tokenizer)
               + weights (every parameter in its dtype)
               + gradients and AdamW state of the trainable parameters (3 copies, fp32 optimizer state)
               + activations of the largest forward pass (padded tokens x layers x bytes per token-layer)
               + the head of the largest pass: the vocabulary's (labelled positions only, in chunks), or a sequence
                 classifier's (one position per example; classification, reward models: the task's `head` in catalog.py)
               + the token arrays of the data.
Bytes per token-layer come from what autograd keeps for a Llama-style block (norm inputs, q/k/v/o
inputs and outputs, rotary copies, the three MLP projections and the SwiGLU product), calibrated
against measured peaks (docs/performance.md); with gradient checkpointing only each block's input is kept,
plus one block's activations during its recomputation.

Time = model FLOPs of the planned tokens / (matmul throughput measured in the weights' dtype x the share
of it a training step reaches: 0.55 in float32, 0.09 in bfloat16 on a CPU with AMX, where the matmuls run
~7x faster than float32's but the rest of the step does not; see docs/performance.md).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from tunesmith.catalog import METHODS, TASKS, task_of_format

GiB = 1024 ** 3
BASELINE_BYTES = 0.55 * GiB   # measured: python + torch + transformers + tokenizers after import, CPU
# achieved share of the matmul peak in a training step, by weight dtype. float32: bench run 2, MFU 58-62 %.
# bfloat16: the TL;DR recipe's 527 tok/s x 0.38 GFLOP/token = 200 of 2270 GFLOP/s (AMX host, session 15).
STEP_EFFICIENCY = {torch.float32: 0.55, torch.bfloat16: 0.09}
HEAD_CHUNK = 128              # rows of the fused vocabulary head (models/heads.py)
LORA_ACTIVATION_SCALE = 1.19  # measured / modelled bytes per token (docs/performance.md)
QUANTIZED_ACTIVATION_SCALE = 2.07  # qlora / lora-int8: peft's unmerged LoRA layers and bitsandbytes keep more per token
FULL_ACTIVATION_SCALE = 0.78
CHECKPOINTED_PER_LAYER = 6    # hidden-size vectors kept per token and block with checkpointing (measured)
OPTIMIZER_BYTES = 12          # per trainable parameter: AdamW's two fp32 moments + a temporary in the fused step


@dataclass
class Plan:
    parts: dict[str, float]              # bytes by component
    available: float                     # bytes of RAM (or GPU memory) available now
    tokens: int                          # real tokens the run will process
    flops_per_token: float
    matmul_gflops: float
    seconds: float
    dtype: torch.dtype = torch.float32   # of the weights: the matmuls' dtype
    budget_seconds: float | None = None  # train.max_minutes
    suggestions: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.total <= 0.9 * self.available

    def describe(self) -> str:
        lines = ["memory estimate (peak):"]
        lines += [f"  {k:<28} {v / GiB:7.2f} GiB" for k, v in self.parts.items()]
        lines.append(f"  {'total':<28} {self.total / GiB:7.2f} GiB of {self.available / GiB:.1f} GiB available"
                     f" -> {'fits' if self.fits else 'DOES NOT FIT'}")
        if self.matmul_gflops:
            lines.append(f"time estimate: {self.tokens:,} tokens x {self.flops_per_token / 1e9:.2f} GFLOP/token at "
                         f"{STEP_EFFICIENCY[self.dtype]:.0%} of {self.matmul_gflops:.0f} GFLOP/s measured in "
                         f"{str(self.dtype).removeprefix('torch.')} -> {_duration(self.seconds)}")
            if self.budget_seconds and self.seconds > self.budget_seconds:
                lines.append(f"  train.max_minutes stops it after {_duration(self.budget_seconds)}: "
                             f"~{self.budget_seconds / self.seconds:.0%} of those tokens")
        if not self.fits:
            lines.append("to make it fit: " + "; ".join(self.suggestions))
        return "\n".join(lines)


def activation_bytes_per_token_layer(config, bytes_per_el: int, lora: bool) -> float:
    h, i = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", heads) * (h // heads)
    # norms (in+out x2), q/k/v in, q/k/v out, rotary q/k, attention out, o in/out,
    # mlp in, gate, up, act(gate), product
    elements = 4 * h + h + (h + 2 * kv) + (h + kv) + h + 2 * h + h + 4 * i
    # calibrated on measured peaks (bench/memory_plan.py): autograd shares some of these saved
    # tensors when all weights train, and the LoRA path keeps more (adapter inputs and outputs)
    return elements * bytes_per_el * (LORA_ACTIVATION_SCALE if lora else FULL_ACTIVATION_SCALE)


def flops_per_token(config, seq_len: float, trained_share: float, full: bool, frozen_blocks: int = 0,
                    head_outputs: int | None = None) -> float:
    """Model FLOPs per real token for one training step: matmuls of the blocks (forward 2N, backward 2N for
    input grads, +2N weight grads when training all weights), attention scores, and the head on the
    positions that carry a label (the only ones the loss needs; `head_outputs`: a classifier's labels, else the
    vocabulary). The first `frozen_blocks` blocks (`method.freeze_layers`) only run forward: backward stops above them."""
    d, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", heads)
    head_dim = d // heads
    block = d * heads * head_dim + 2 * d * kv * head_dim + heads * head_dim * d + 3 * d * inter
    block_forward = 2 * block + 2 * seq_len * d  # causal attention QK^T and AV, halved for the mask
    head = 2 * d * (head_outputs or config.vocab_size) * trained_share
    mult = 3 if full else 2
    frozen = min(frozen_blocks, layers)
    return mult * ((layers - frozen) * block_forward + head) + frozen * block_forward


def matmul_dtype(model) -> torch.dtype:
    """The dtype most of the model's floating-point weights are in (a bf16 base with fp32 adapters is bf16;
    QLoRA's packed weights compute in their float32 dtype): the dtype `matmul_gflops` should measure."""
    count: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            count[p.dtype] = count.get(p.dtype, 0) + p.numel()
    dtype = max(count, key=count.get, default=torch.float32)
    return dtype if dtype in STEP_EFFICIENCY else torch.float32


def estimate(cfg, model, n_trainable: int, data_stats: dict, total_steps: int, time_it: float = 0.0,
             matmuls: torch.dtype | None = None, task: str | None = None) -> Plan:
    """With `time_it` seconds, this machine's matmul throughput is measured in the training matmuls' dtype (`matmuls`:
    bfloat16 for full fine-tuning's weight copies; by default the weights' dtype) for a time estimate; without (as in
    `train`'s own pre-flight check) the time is not estimated. The head estimated is the one `task` declares (by
    default the config's task, or the one its data format trains)."""
    config = model.config
    el = next(model.parameters()).element_size()
    n_params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    train = data_stats["train"]
    max_len = train["length_max"]
    budget = cfg.train.batch_tokens or cfg.train.micro_batch_size * max_len
    pass_tokens = min(cfg.train.micro_batch_size * max_len, max(budget, max_len))
    frozen = min(cfg.method.freeze_layers, config.num_hidden_layers)
    trained_layers = config.num_hidden_layers - frozen  # frozen blocks save no activations
    spec = METHODS[cfg.method.name]
    quantized = spec.quantized_bits is not None
    per_layer = activation_bytes_per_token_layer(config, el, not spec.weight_grads)
    if quantized:
        per_layer *= QUANTIZED_ACTIVATION_SCALE / LORA_ACTIVATION_SCALE
    if cfg.train.gradient_checkpointing:
        acts = pass_tokens * (trained_layers * CHECKPOINTED_PER_LAYER * config.hidden_size * el + per_layer)
    else:
        acts = pass_tokens * trained_layers * per_layer
    task = task or (cfg.task if cfg.task in TASKS else task_of_format(data_stats.get("format") or "text"))
    mean_len = train["tokens"] / max(1, train["kept"])
    if TASKS[task].head == "classes":  # one scored position per example, a score per label
        head_name, outputs, trained_share = "classifier head", getattr(config, "num_labels", 1), 1 / max(1.0, mean_len)
        head = cfg.train.micro_batch_size * outputs * 4 * 3
    else:
        head_name, outputs, trained_share = "vocabulary head", None, train["label_share"]
        head = min(pass_tokens, HEAD_CHUNK) * config.vocab_size * 4 * 3  # logits, softmax, grad of one chunk
    parts = {
        "process baseline": BASELINE_BYTES,
        f"weights ({n_params / 1e6:.0f}M params)": weight_bytes,
        f"grads + AdamW ({n_trainable / 1e6:.1f}M trainable)": n_trainable * (el + OPTIMIZER_BYTES),
        f"activations ({pass_tokens} tokens/pass)": acts,
        head_name: head,
        "data token arrays": train["tokens"] * 8 + data_stats["val"]["tokens"] * 8,
    }
    if quantized:  # bitsandbytes de-quantizes each weight to full precision for its matmul, kept for backward
        packed = sum(p.numel() for p in model.parameters() if p.dtype in (torch.uint8, torch.int8))
        parts["de-quantized weight copies"] = packed * (8 if spec.quantized_bits == 4 else 4)
    examples_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum
    tokens = int(total_steps * examples_per_step * mean_len)
    fpt = flops_per_token(config, mean_len, trained_share, spec.weight_grads, frozen, outputs)
    dtype = matmuls or matmul_dtype(model)
    gflops = matmul_gflops(time_it, dtype, next(model.parameters()).device) if time_it else 0.0
    seconds = tokens * fpt / (gflops * 1e9 * STEP_EFFICIENCY[dtype]) if gflops else 0.0
    budget_seconds = cfg.train.max_minutes * 60 if cfg.train.max_minutes else None
    plan = Plan(parts, available_memory(), tokens, fpt, gflops, seconds, dtype, budget_seconds)
    plan.suggestions = _suggestions(cfg, pass_tokens)
    return plan


def _suggestions(cfg, pass_tokens: int) -> list[str]:
    out = []
    if cfg.train.micro_batch_size > 1:
        out.append(f"train.micro_batch_size={max(1, cfg.train.micro_batch_size // 2)} with "
                   f"train.grad_accum={cfg.train.grad_accum * 2} (same effective batch)")
    if (cfg.train.batch_tokens or pass_tokens) > 256:
        out.append(f"train.batch_tokens={max(128, pass_tokens // 2)}")
    if not cfg.train.gradient_checkpointing:
        out.append("train.gradient_checkpointing=true")
    if METHODS[cfg.method.name].weight_grads:
        out.append("method.name=lora")
    out.append(f"data.max_length={max(64, cfg.data.max_length // 2)}")
    return out


def available_memory() -> float:
    if torch.cuda.is_available():
        return float(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return float(info.get("MemAvailable", info["MemTotal"]))
    except (OSError, KeyError, ValueError):
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def matmul_gflops(seconds: float = 1.0, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> float:
    """Matmul throughput of this machine now in `dtype` on `device` (where the model trains: a GPU run measured on the
    host's CPU was planned at a hundredth of its speed), on an MLP-like shape (8x the rows on a GPU, whose kernel
    launches would otherwise dominate; synchronised before the clock is read)."""
    device = torch.device(device or "cpu")
    rows = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(rows, 576, dtype=dtype, device=device), torch.randn(576, 1536, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        for _ in range(8 if device.type == "cuda" else 1):
            a @ b
            n += 1
        sync()
    return n * 2 * rows * 576 * 1536 / (time.perf_counter() - t) / 1e9


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"~{seconds:.0f} s"
    if seconds < 5400:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds / 3600:.1f} h"


def plan_config(cfg) -> Plan:
    """`tunesmith plan`: assemble the run as `train` does (model, data, task, precision, method), then estimate."""
    from tunesmith.assemble import assemble
    from tunesmith.models import pick_device
    from tunesmith.train.machine import configure_threads
    from tunesmith.train.schedule import plan_steps

    configure_threads(cfg.train.threads)
    run = assemble(cfg, pick_device())
    cfg = run.effective_config
    _, total_steps = plan_steps(cfg, run.data.stats["train"]["kept"])
    return estimate(cfg, run.model, run.params["trainable"], run.data.stats, total_steps, time_it=1.0,
                    matmuls=run.precision.matmuls, task=run.task)
