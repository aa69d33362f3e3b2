"""Training: the loop (loop.py) and its machinery: processes (distributed, zero), checkpoints and progress, the
schedule and optimizer, threads, stop requests, the memory/time plan."""
