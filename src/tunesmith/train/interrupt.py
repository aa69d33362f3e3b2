"""Ctrl-C / SIGTERM during a run. While training: the first one asks the loop to stop after the current step (it then
writes a checkpoint and prints the resume command); a second one stops at once. Once the trained weights are saved
(`final/`), a signal stops the closing evaluation at once: the run is left "trained, evaluation incomplete", which
`tunesmith eval RUN` completes.

The handler itself only sets a flag (or raises): it writes one line to stderr with `os.write`, never through Python's
buffered streams, tqdm or the log file, which a signal can interrupt in the middle of a write of their own (the
"reentrant call" error). The loop writes the stop to train.log when it sees the flag.
"""
from __future__ import annotations

import os
import signal
import threading


class StopRequests:
    def __init__(self, announce: bool = True):
        self.signal_name, self.announce, self._old = None, announce, {}
        self.at_once: Exception | None = None  # raised by the next signal (the closing evaluation), when set

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def stop_at_once(self, exc: Exception) -> None:
        """From now on a signal raises `exc` where the code is (nothing left that a stop would lose)."""
        self.at_once = exc

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.at_once is not None:
            self.signal_name = name
            exc, self.at_once = self.at_once, None
            self._say(f"{name}: stopping the closing evaluation (the trained model is saved)")
            raise exc
        if self.requested:
            self.__exit__()
            raise KeyboardInterrupt
        self.signal_name = name
        self._say(f"{name}: finishing this step and writing a checkpoint (press Ctrl-C again to stop at once)")

    def _say(self, text: str) -> None:
        if self.announce:
            try:
                os.write(2, f"\n{text}\n".encode())
            except OSError:
                pass

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
    """Raised once what can be saved is saved; carries the command that continues: resuming the run, or completing its
    evaluation (`next_step` says which)."""

    def __init__(self, message: str, command: str, next_step: str = "resume with"):
        super().__init__(message)
        self.resume_command, self.next_step = command, next_step
