"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): a small down-projection,
GELU, up-projection and residual after the feed-forward output of every block (`pfeiffer`), or
after both the attention and the feed-forward outputs (`houlsby`). The up-projection starts at
zero, so training starts from the unchanged model. Our own small module: the `adapters` library
does not support this transformers version."""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.catalog import has_class_head
from tunesmith.errors import TunesmithError
from tunesmith.methods.load import save_trainable
from tunesmith.methods.bitfit import classifier_head

FFN_OUT = r"(mlp\.down_proj|(?<!attention\.)output\.dense|mlp\.c_proj|mlp\.fc2)"
ATTN_OUT = r"(self_attn\.o_proj|attention\.output\.dense|attn\.c_proj|self_attn\.out_proj)"


class Bottleneck(nn.Module):
    def __init__(self, inner: nn.Linear, size: int):
        super().__init__()
        self.inner = inner
        d = inner.out_features
        self.down = nn.Linear(d, size, dtype=inner.weight.dtype, device=inner.weight.device)
        self.up = nn.Linear(size, d, dtype=inner.weight.dtype, device=inner.weight.device)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        return y + self.up(F.gelu(self.down(y)))


def apply(model, cfg, task: str = "causal"):
    model.requires_grad_(False)
    pattern = re.compile(rf"\.{FFN_OUT}$" if cfg.adapter_style == "pfeiffer" else rf"\.({FFN_OUT}|{ATTN_OUT})$")
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.search(n)]
    if not targets:
        raise TunesmithError(f"method.name=adapters: no feed-forward output layers recognised in {type(model).__name__} "
                             f"(supported: Llama/Mistral/Qwen-style mlp.down_proj, BERT-style output.dense, GPT-2 mlp.c_proj)")
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        wrapped = Bottleneck(module, cfg.adapter_size)
        setattr(model.get_submodule(parent_name), attr, wrapped)
    if has_class_head(task):
        classifier_head(model).requires_grad_(True)
    return model


def save(model, tokenizer, out_dir, cfg, task: str = "causal", state_dict: dict | None = None):
    save_trainable(model, tokenizer, out_dir, cfg, task, state_dict)
