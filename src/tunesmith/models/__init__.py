"""Model loading: bundled short names, local folders, GGUF files, run dirs, hub ids."""
from tunesmith.models.load import BUNDLED, load_model, load_tokenizer, max_positions, merge_adapter, model_fingerprint, pick_autocast, pick_device, pick_dtype, resolve_model_dir

__all__ = ["BUNDLED", "load_model", "load_tokenizer", "max_positions", "merge_adapter", "model_fingerprint", "pick_autocast", "pick_device", "pick_dtype", "resolve_model_dir"]
