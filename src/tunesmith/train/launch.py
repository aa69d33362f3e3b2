"""`tunesmith train --nproc N`: this very command again, under torchrun, with signals and failures handled.

torchrun (torch.distributed.run) starts the worker processes in sessions of their own, so a terminal's Ctrl-C does not
reach them, and `subprocess.call` kills its child on Ctrl-C (the workers were orphaned, printing after the prompt).
Instead torchrun runs in a session of its own too, and this process forwards SIGINT and SIGTERM to it once each:
torchrun passes the signal on to every worker, which finishes its step and writes a checkpoint (train/interrupt.py),
and waits `SHUTDOWN_SECONDS` for them before it kills them. A preemption's SIGTERM thus ends in a checkpoint.

When a worker dies (OOM-killed, a segfault), torchrun stops the others, whose next collective fails at once (gloo) or
at the process-group timeout (`train.process_timeout_minutes`); its report names the rank that failed, and this
process repeats that in one line with the last checkpoint and the resume command.
"""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading

from tunesmith.paths import child_env

SHUTDOWN_SECONDS = 600  # what torchrun waits for its workers' graceful stop (a step, then a checkpoint) before killing


def run_under_torchrun(train_args: list[str], nproc: int, where: list[str], log=print) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *where,
           "--shutdown-timeout", str(SHUTDOWN_SECONDS), "-m", "tunesmith.cli.main", "train", *train_args]
    log("launching: " + " ".join(cmd))
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                            start_new_session=True)
    seen = {"run": None, "failed": None, "exitcode": None}
    echoes = [threading.Thread(target=_echo, args=(stream, out, seen), daemon=True)
              for stream, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))]
    for echo in echoes:
        echo.start()

    signalled = []

    def forward(signum, frame):
        signalled.append(signal.Signals(signum).name)
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    for echo in echoes:
        echo.join(timeout=5)
    if code and signalled:  # the workers stopped as asked: their checkpoint is written (train/interrupt.py)
        log(f"tunesmith: stopped by {signalled[0]}; resume with: tunesmith train --resume {seen['run'] or 'RUN_DIR'} "
            f"--nproc {nproc}")
        return 130
    if code and seen["failed"] is not None:
        run = seen["run"] or "RUN_DIR"
        log(f"tunesmith: process rank {seen['failed']} failed (exit code {seen['exitcode']}); the other processes were "
            f"stopped. Resume from the run's last checkpoint: tunesmith train --resume {run} --nproc {nproc}")
    return code


def _echo(stream, out, seen: dict) -> None:
    """torchrun's and the workers' output, passed through line by line; the run folder and a failed rank noted."""
    root_cause = False
    for line in stream:
        out.write(line)
        out.flush()
        if m := re.search(r"tunesmith: (?:run|resuming) (\S+) \|", line):
            seen["run"] = m.group(1)
        if "Root Cause" in line:
            root_cause = True
        elif root_cause and (m := re.match(r"\s*rank\s*:\s*(\d+)", line)):
            seen["failed"] = int(m.group(1))
        elif root_cause and (m := re.match(r"\s*exitcode\s*:\s*(-?\d+)", line)):
            seen["exitcode"] = int(m.group(1))
