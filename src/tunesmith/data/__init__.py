"""Data: read files, detect and validate the record shape, render, mask, tokenize, split, batch."""
from tunesmith.data.prepare import PreparedData, prepare

__all__ = ["PreparedData", "prepare"]
