"""Evaluation: held-out loss / perplexity / token accuracy, generation, side-by-side tables."""
