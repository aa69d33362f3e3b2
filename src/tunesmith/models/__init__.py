"""Base models and what runs them: loading (bundled short names, local folders, GGUF files, run dirs, hub ids), the
label-only loss head, generation, NEFTune noise."""
from tunesmith.models.load import (BUNDLED, cpu_has_amx, inference_dtype, load_base_model, load_tokenizer, model_fingerprint,
                                   pick_device, resolve_model_dir)

__all__ = ["BUNDLED", "cpu_has_amx", "inference_dtype", "load_base_model", "load_tokenizer", "model_fingerprint",
           "pick_device", "resolve_model_dir"]
