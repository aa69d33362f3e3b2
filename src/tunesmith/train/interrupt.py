"""Ctrl-C / SIGTERM during training: the first one asks the loop to stop after the current step
(it then writes a checkpoint and prints the resume command); a second one stops at once."""
from __future__ import annotations

import signal
import threading


class StopRequests:
    def __init__(self, log):
        self.log, self.signal_name, self._old = log, None, {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame):
        if self.requested:
            self.__exit__()
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        self.log(f"{self.signal_name}: finishing this step and writing a checkpoint (press Ctrl-C again to stop at once)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
        return False


class TrainingInterrupted(Exception):
    """Raised after the checkpoint is written; carries the command that resumes the run."""

    def __init__(self, message: str, resume_command: str):
        super().__init__(message)
        self.resume_command = resume_command
