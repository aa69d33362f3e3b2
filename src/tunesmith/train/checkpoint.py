"""Mid-run checkpoints: trainable weights, optimizer state, counters and RNG states, written atomically."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from tunesmith.train.rundir import publish_dir


def save(run_dir: Path, step: int, model, optimizer, record: dict) -> Path:
    target = run_dir / "checkpoints" / f"step-{step:07d}"
    target.parent.mkdir(exist_ok=True)
    trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}

    def write(tmp: Path) -> None:
        save_file(trainable, tmp / "trainable.safetensors")
        torch.save({"optimizer": optimizer.state_dict(),
                    "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}},
                   tmp / "state.pt")
        (tmp / "progress.json").write_text(json.dumps({"step": step, **record}))

    publish_dir(target, write)
    return target
