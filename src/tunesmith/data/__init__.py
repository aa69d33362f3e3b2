"""Data: read files, detect and validate the record shape, render, mask, tokenize, split, batch."""
from tunesmith.data.prepare import prepare
from tunesmith.data.render import PreparedData
from tunesmith.data.shapes import resolve_task

__all__ = ["PreparedData", "prepare", "resolve_task"]
