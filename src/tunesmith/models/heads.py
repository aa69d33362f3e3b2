"""Loss on response tokens only, without full-vocabulary logits for the whole batch.

The prompt is most of the tokens in instruction data (~90 % in the docstring task), so the
vocabulary head runs only on positions that have a label. `LinearCrossEntropy` computes the
loss and its gradients chunk by chunk in the forward pass (softmax - one-hot, then two
matmuls), so logits are never stored for backward: less memory and one softmax pass.
`reference_loss` is the plain transformers computation; tests check both agree.

Rows of a pass that start with the same tokens (a system prompt, a fixed instruction) share that
prefix's computation: it runs once as one row, its keys/values are repeated for every row, and the
rows run on from there (`shared_prefix_length`); gradients flow back through the repeat, so the
result is the same as running every row in full.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tunesmith.errors import TunesmithError
from tunesmith.models import neftune

IGNORE = -100
CHUNK = 128  # label positions per head chunk: 128 x 49k vocab x 4 bytes = 25 MB, under glibc's mmap ceiling
# The prefix runs as a second forward call, which costs a fixed amount per call (launches, the key/value copies), so a
# pass shares its prefix only when that saves at least this many token computations ((rows - 1) x prefix length).
# It was 128 while every call rebuilt the merged LoRA weights; with them kept, 32 and 128 measure the same on the
# instruction mix, and 0 and 32 the same on DPO pairs (docs/performance.md).
MIN_SHARED_TOKENS = 32
# Config fields of models whose forward changes the logits after the output head (Gemma 2's tanh soft-capping, Cohere's
# and Granite's scale factors): hidden @ head.T is not their logits, so they take the reference path.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i); gradients computed eagerly in forward.

    With label smoothing e the target is (1 - e) one-hot + e uniform, as in F.cross_entropy(label_smoothing=e):
    CE_i = lse_i - (1 - e) z_i[t] - e mean(z_i), gradient softmax - (1 - e) one-hot - e / V."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, smoothing=0.0):
        need_w = ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros_like(weight) if need_w else None
        acc = torch.promote_types(hidden.dtype, torch.float32)  # softmax in at least fp32
        total = hidden.new_zeros((), dtype=acc)
        for s in range(0, hidden.shape[0], CHUNK):
            h, t = hidden[s:s + CHUNK], targets[s:s + CHUNK]
            logits = (h @ weight.T).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            rows = torch.arange(len(t), device=t.device)
            total += (lse - logits[rows, t]).sum()
            if smoothing:
                total += smoothing * (logits[rows, t] - logits.mean(-1)).sum()
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
            probs[rows, t] -= 1.0 - smoothing          # d(sum CE)/d logits
            if smoothing:
                probs -= smoothing / probs.shape[-1]
            probs = probs.to(hidden.dtype)
            grad_h[s:s + CHUNK] = probs @ weight
            if need_w:
                grad_w.addmm_(probs.T, h)
        ctx.save_for_backward(grad_h, grad_w if need_w else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, (grad_w * grad_out if grad_w is not None else None), None, None


@torch.no_grad()
def _eval_head(hidden, weight, targets) -> tuple[torch.Tensor, torch.Tensor]:
    total = hidden.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    for s in range(0, hidden.shape[0], CHUNK):
        logits = (hidden[s:s + CHUNK] @ weight.T).float()
        t = targets[s:s + CHUNK]
        total += F.cross_entropy(logits, t, reduction="sum")
        correct += (logits.argmax(-1) == t).sum()
    return total, correct


def split_model(model):
    """(backbone, output head weight) of a causal LM, looking through a peft wrapper; None if the head is
    adapted, the model's forward transforms the head's logits (LOGIT_TRANSFORMS) or the method works on the inputs
    (prompt/prefix tuning): then the model's own forward must run."""
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and peft_config.is_prompt_learning:
        return None
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = inner.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    if any(getattr(inner.config, field, None) not in (None, 1, 1.0) for field in LOGIT_TRANSFORMS):
        return None
    return getattr(inner, inner.base_model_prefix), head


def hidden_and_head(model, input_ids: torch.Tensor):
    """(final hidden states, output head weight), or None when the model's own forward must run (see split_model).
    Under FSDP the root module's forward must run (it gathers the embeddings, final norm and head), so the
    whole model runs with its head on the last position only and the backbone's output is captured."""
    parts = split_model(model)
    if parts is None:
        return None
    backbone, head = parts
    if not _is_fsdp(model):
        return _backbone_hidden(backbone, input_ids), head.weight
    captured = {}

    def keep(module, args, out) -> None:  # returns None: the output itself is left alone
        captured["hidden"] = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    hook = backbone.register_forward_hook(keep)
    try:
        model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    return captured["hidden"], head.weight  # the root's weights stay gathered until its backward


def shared_prefix_length(input_ids: torch.Tensor) -> int:
    """How many leading tokens every row has in common (at most width - 1: one token must follow)."""
    if input_ids.shape[0] < 2:
        return 0
    differs = (input_ids != input_ids[:1]).any(0).nonzero()
    return min(int(differs[0]) if len(differs) else input_ids.shape[1], input_ids.shape[1] - 1)


def _backbone_hidden(backbone, input_ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states of every row; a prefix common to all rows is computed once (module docstring)."""
    prefix = shared_prefix_length(input_ids)
    if ((input_ids.shape[0] - 1) * prefix < MIN_SHARED_TOKENS or getattr(backbone, "is_gradient_checkpointing", False)
            or neftune.is_on(backbone)):
        return backbone(input_ids=input_ids, use_cache=False).last_hidden_state
    from transformers import DynamicCache

    rows = input_ids.shape[0]
    cache = DynamicCache(config=backbone.config)
    head = backbone(input_ids=input_ids[:1, :prefix], past_key_values=cache, use_cache=True).last_hidden_state
    cache.batch_repeat_interleave(rows)
    tail = backbone(input_ids=input_ids[:, prefix:], past_key_values=cache, use_cache=True).last_hidden_state
    return torch.cat([head.expand(rows, -1, -1), tail], dim=1)


def _is_fsdp(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions whose next token is trained, and those next tokens."""
    shifted = labels[:, 1:]
    mask = shifted != IGNORE
    return mask, shifted[mask].long()


def label_logits(model, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, V) logits at the positions whose next token is trained, and those N targets."""
    mask, targets = label_positions(labels)
    parts = hidden_and_head(model, input_ids)
    if parts is None:
        logits = model(input_ids=input_ids, use_cache=False).logits[:, -input_ids.shape[1]:-1][mask]
    else:
        hidden, weight = parts
        logits = hidden[:, :-1][mask] @ weight.T
    return logits.float(), targets


def sum_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, with_accuracy: bool = False,
             label_smoothing: float = 0.0):
    """Summed CE over trained tokens (normalise by the global label-token count outside). Label smoothing applies
    to the training loss only: evaluation (no grad, or with accuracy) always reports plain cross-entropy.

    Batches are right-padded and passed without an attention mask: with causal attention no real
    token can see a pad to its right, so the result is exact and SDPA takes its fast causal path.
    """
    evaluating = with_accuracy or not torch.is_grad_enabled()
    smoothing = 0.0 if evaluating else label_smoothing
    parts = hidden_and_head(model, input_ids)
    if parts is None:
        return reference_sum_loss(model, input_ids, labels, with_accuracy, smoothing)
    hidden, weight = parts
    mask, targets = label_positions(labels)
    h = hidden[:, :-1][mask]
    if evaluating:
        total, correct = _eval_head(h, weight, targets)
        return (total, correct) if with_accuracy else total
    return LinearCrossEntropy.apply(h, weight, targets, smoothing)


def reference_sum_loss(model, input_ids, labels, with_accuracy: bool = False, label_smoothing: float = 0.0):
    """The straightforward path: full logits from the model, then cross-entropy."""
    logits = model(input_ids=input_ids, use_cache=False).logits
    logits = logits[:, -input_ids.shape[1]:-1].float()  # prompt tuning prepends virtual positions
    mask, targets = label_positions(labels)
    sel = logits[mask]
    total = F.cross_entropy(sel, targets, reduction="sum", label_smoothing=label_smoothing)
    if with_accuracy:
        return total, (sel.argmax(-1) == targets).sum()
    return total


def class_sum_loss(model, batch, return_logits: bool = False, label_smoothing: float = 0.0):
    """Summed cross-entropy of a classification batch (normalise by the step's example count outside)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    loss = F.cross_entropy(logits, batch.classes, reduction="sum", label_smoothing=label_smoothing)
    return (loss, logits) if return_logits else loss


def last_token_positions(input_ids: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """(rows,) the position a sequence classifier reads each row's score at: its rightmost token that is not the pad
    id, the rule transformers' *ForSequenceClassification applies (so a score here is the one plain transformers
    gives for the same ids)."""
    if pad_id is None:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, dtype=torch.long, device=input_ids.device)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (positions * (input_ids != pad_id)).argmax(-1)


def sequence_scores(model, input_ids: torch.Tensor, pad_id: int | None,
                    answer_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(rows, labels) float32 scores of a sequence classifier on right-padded rows. A decoder's rows share their common
    prefix's computation (a reward model's chosen and rejected answers share the prompt) and the head runs on one
    position per row; encoders, prompt learning and FSDP run the model's own forward with an attention mask.

    Read at each row's last non-pad token (transformers' rule), or, with `answer_mask` (rows, T) marking each row's
    answer tokens, the mean of the head's per-token scores over them (a reward model's `reward.pooling: mean`; the
    head is linear, so that is the head applied to the answer's mean hidden state). A row whose mask is empty is read
    at its last token."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    peft_config = getattr(model, "active_peft_config", None)
    prompt_learning = peft_config is not None and peft_config.is_prompt_learning
    last = last_token_positions(input_ids, pad_id)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    if answer_mask is not None:
        answer_mask = answer_mask.clone()
        answer_mask[rows, last] |= ~answer_mask.any(1)
        if not hasattr(inner, "score") or getattr(inner.config, "is_encoder_decoder", False):
            raise TunesmithError(f"a mean over the answer's tokens (reward.pooling: mean) reads a decoder's score head at "
                                 f"every token; {type(inner).__name__} scores the whole sequence at once: use "
                                 f"reward.pooling: last")
    if hasattr(inner, "score") and not prompt_learning and not _is_fsdp(model) and not inner.config.is_encoder_decoder:
        hidden = _backbone_hidden(getattr(inner, inner.base_model_prefix), input_ids)
        if answer_mask is None:
            return inner.score(hidden[rows, last]).float()
        return inner.score(_mean_over(hidden, answer_mask)).float()
    mask = (torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] <= last[:, None]).long()
    if answer_mask is None:
        return model(input_ids=input_ids, attention_mask=mask).logits.float()
    captured = {}

    def keep(module, args, out) -> None:  # the head's score at every position, before the model keeps the last one
        captured["scores"] = out

    hook = inner.score.register_forward_hook(keep)
    try:
        model(input_ids=input_ids, attention_mask=mask)
    finally:
        hook.remove()
    scores = captured["scores"][:, -input_ids.shape[1]:].float()  # prompt tuning prepends virtual positions
    return _mean_over(scores, answer_mask)


def _mean_over(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(rows, ...) means of (rows, T, ...) values over the positions `mask` (rows, T) marks."""
    weights = mask.to(values.dtype)[..., None]
    return (values * weights).sum(1) / weights.sum(1)
