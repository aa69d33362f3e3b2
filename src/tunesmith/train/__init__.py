"""Training: the loop (loop.py), the loss head, threads, checkpoints and the run directory."""
