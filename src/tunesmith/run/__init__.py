"""A run's folder and what is written into it, below everything that trains, evaluates or exports: the layout (every
file name spelled once, `RunDir`), atomic writes and publishing, the run log and experiment trackers."""
from tunesmith.run.layout import RunDir

__all__ = ["RunDir"]
