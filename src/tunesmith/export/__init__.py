"""Deploy: merge into a plain HF model, GGUF for llama.cpp/Ollama (verified), the adapter alone."""
