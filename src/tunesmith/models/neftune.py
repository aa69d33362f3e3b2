"""NEFTune (Jain et al. 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning"): while the model trains,
uniform noise in [-b, b], b = alpha / sqrt(L x d), is added to its input embeddings (L the pass's padded length, d the
embedding width) -- what TRL's, axolotl's and LLaMA-Factory's `neftune_noise_alpha` do. Held-out evaluation and
generation switch the model to eval mode and see the clean embeddings."""
import math

import torch


def add_noise(model, alpha: float):
    """Hook the noise onto `model`'s input embeddings; returns the function that removes it."""
    embeddings = model.get_input_embeddings()

    def noisy(module, args, output):
        if not module.training:
            return None  # None leaves the output as it is
        bound = alpha / math.sqrt(output.shape[-2] * output.shape[-1])
        return output + torch.empty_like(output).uniform_(-bound, bound)

    handle = embeddings.register_forward_hook(noisy)
    embeddings.neftune_noise_alpha = alpha  # read by models.heads: every row runs whole, each with noise of its own

    def remove() -> None:
        handle.remove()
        del embeddings.neftune_noise_alpha

    return remove


def is_on(backbone) -> bool:
    """Whether this forward adds noise (the shared-prefix shortcut in models.heads would give every row the same)."""
    return backbone.training and hasattr(backbone.get_input_embeddings(), "neftune_noise_alpha")
